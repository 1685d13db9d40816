//! A pod's network: the CNI interface of the pod's network namespace, connected to the VM.
//!
//! containerd's CRI plugin creates the pod's network namespace and runs CNI in it before it
//! creates the sandbox container; the sandbox's spec names that namespace. [`connect`] enters
//! it (on a thread of its own), reads the one CNI interface (`eth0`: its MAC, MTU, IPv4
//! addresses and routes), creates the tap [`TAP_NAME`] beside it and joins the two with tc:
//! an ingress qdisc on each and a filter that redirects every frame arriving on one to the
//! other's egress (`mirred`), the way Kata's `tcfilter` model does. The tap is opened the way
//! husk-vmm takes one (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte vnet header) and
//! handed to it as an open descriptor, so the jailed VMM needs no network privilege. The
//! guest's virtio-net interface gets the CNI interface's MAC, and the agent gives it the
//! addresses and routes ([`PodNetwork::interface`], [`PodNetwork::routes`]): the guest
//! answers on the IP CRI reports, and the CNI interface in the namespace is only a wire.
//!
//! The tap is not persistent: it goes away when its last descriptor (the VMM's) closes.
//! [`disconnect`] removes the ingress qdisc (and with it the filter) from the CNI interface,
//! so the namespace is left as CNI made it.
//!
//! The guest kernel has no IPv6: IPv6 addresses and routes of the interface are left out
//! (logged). A namespace with no interface but `lo` gets no network device (a `ctr run`
//! container given an empty namespace); one with more than one is refused, as is the
//! shim's own (the host's) namespace, whose interface a redirect would take from the host.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tracing::{info, warn};

/// The tap's name in the pod's network namespace.
pub const TAP_NAME: &str = "tap0_husk";
/// The vnet header size husk-vmm's device passes frames with.
pub const VNET_HDR_SIZE: i32 = 12;
/// `ETH_P_ALL` as tc wants it in a filter's protocol: in network byte order.
const PROTOCOL_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();
/// The ingress qdisc's handle (`ffff:`), which is also its filters' parent.
const INGRESS_PARENT: u32 = 0xffff_0000;
/// The main routing table.
const MAIN_TABLE: u8 = libc::RT_TABLE_MAIN;

/// Errors while connecting a pod's network namespace to its VM.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The namespace cannot be opened or entered
    #[error("Cannot enter the pod's network namespace {0}: {1}")]
    Namespace(PathBuf, io::Error),
    /// The namespace is the shim's own
    #[error("The pod's network namespace {0} is the host's own; husk connects a pod's VM only to a network namespace of the pod")]
    HostNamespace(PathBuf),
    /// More than one interface to connect
    #[error("The pod's network namespace {0} has several interfaces ({1}); husk connects exactly one to the pod's VM")]
    Interfaces(PathBuf, String),
    /// The tap name is taken
    #[error(
        "The pod's network namespace {0} already has a {TAP_NAME} (is another VM connected to it?)"
    )]
    TapExists(PathBuf),
    /// The tap cannot be created
    #[error("Cannot create the tap {TAP_NAME}: {0}")]
    Tap(io::Error),
    /// A netlink request failed
    #[error("Cannot {0}: {1}")]
    Netlink(String, rtnetlink::Error),
    /// The thread that did the work died
    #[error("The thread that connects the pod's network namespace {0} panicked")]
    Panicked(PathBuf),
}

/// An IPv4 address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    /// The address.
    pub address: Ipv4Addr,
    /// The prefix length.
    pub prefix_len: u8,
}

/// The guest interface's configuration: the CNI interface's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Its name (`eth0`).
    pub name: String,
    /// Its MAC address.
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u32,
    /// Its IPv4 addresses.
    pub addresses: Vec<Ipv4Net>,
}

/// A route of the CNI interface, to be added in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The destination; `None` for the default route.
    pub destination: Option<Ipv4Net>,
    /// The next hop; `None` for a route on the link.
    pub gateway: Option<Ipv4Addr>,
    /// The preferred source address.
    pub source: Option<Ipv4Addr>,
    /// The route's scope (`RT_SCOPE_*`).
    pub scope: u8,
}

/// A pod's network namespace, connected to a tap for its VM.
#[derive(Debug)]
pub struct PodNetwork {
    /// The namespace.
    pub netns: PathBuf,
    /// The tap (close-on-exec; the VMM gets a copy at [`crate::vmm::NET_TAP_FD`]).
    pub tap: OwnedFd,
    /// The interface the guest gets.
    pub interface: Interface,
    /// Its routes (in the guest, the interface's name is the same).
    pub routes: Vec<Route>,
}

impl PodNetwork {
    /// What [`disconnect`] needs later: the namespace and the interface's name.
    pub fn connection(&self) -> (PathBuf, String) {
        (self.netns.clone(), self.interface.name.clone())
    }
}

/// Formats a MAC address as `xx:xx:xx:xx:xx:xx`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Creates tap `name` in the calling thread's network namespace, as husk-vmm takes one, and
/// returns its descriptor (close-on-exec).
pub fn open_tap(name: &str) -> io::Result<OwnedFd> {
    let check = |rc: libc::c_int, what: &str| {
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
        }
        Ok(())
    };
    // SAFETY: ifreq is plain old data; zeroes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *s as libc::c_char;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads and updates the ifreq, which outlives the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as libc::Ioctl, &mut req) };
    check(rc, "TUNSETIFF")?;
    // SAFETY: TUNSETVNETHDRSZ reads one int, which outlives the call.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETVNETHDRSZ as libc::Ioctl,
            &VNET_HDR_SIZE,
        )
    };
    check(rc, "TUNSETVNETHDRSZ")?;
    Ok(OwnedFd::from(file))
}

/// Runs `work` on a new thread in network namespace `netns`, on a current-thread runtime
/// (netlink sockets belong to the namespace of the thread that opens them).
fn in_netns<T, F>(netns: &Path, work: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce(
            Handle,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, NetworkError>>>>
        + Send
        + 'static,
{
    let ns_error = |e| NetworkError::Namespace(netns.to_owned(), e);
    let file = File::open(netns).map_err(ns_error)?;
    let own = std::fs::metadata("/proc/thread-self/ns/net").map_err(ns_error)?;
    let theirs = file.metadata().map_err(ns_error)?;
    if (own.dev(), own.ino()) == (theirs.dev(), theirs.ino()) {
        return Err(NetworkError::HostNamespace(netns.to_owned()));
    }
    let path = netns.to_owned();
    std::thread::spawn(move || {
        let ns_error = |e| NetworkError::Namespace(path.clone(), e);
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| ns_error(e.into()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(ns_error)?;
        rt.block_on(async move {
            let (connection, handle, _) = rtnetlink::new_connection().map_err(ns_error)?;
            tokio::spawn(connection);
            work(handle).await
        })
    })
    .join()
    .map_err(|_| NetworkError::Panicked(netns.to_owned()))?
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |e| NetworkError::Netlink(what, e)
}

/// The index of interface `name`, if it exists.
async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, rtnetlink::Error> {
    let found: Result<Vec<LinkMessage>, _> = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_collect()
        .await;
    match found {
        Ok(links) => Ok(links.first().map(|l| l.header.index)),
        // The kernel answers a lookup of a missing name with ENODEV.
        Err(rtnetlink::Error::NetlinkError(e))
            if e.to_io().raw_os_error() == Some(libc::ENODEV) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

/// Connects the CNI interface of `netns` to a new tap; `Ok(None)` when the namespace has no
/// interface but `lo`.
pub fn connect(netns: &Path) -> Result<Option<PodNetwork>, NetworkError> {
    let path = netns.to_owned();
    let found = in_netns(netns, move |handle| {
        Box::pin(async move { connect_in(&handle, &path).await })
    })?;
    Ok(found.map(|(tap, interface, routes)| {
        info!(
            netns = %netns.display(),
            interface = %interface.name,
            mac = %format_mac(&interface.mac),
            addresses = ?interface.addresses,
            "pod network connected to {TAP_NAME}"
        );
        PodNetwork {
            netns: netns.to_owned(),
            tap,
            interface,
            routes,
        }
    }))
}

type Connected = (OwnedFd, Interface, Vec<Route>);

async fn connect_in(handle: &Handle, netns: &Path) -> Result<Option<Connected>, NetworkError> {
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("list the interfaces"))?;
    if links.iter().any(|l| link_name(l) == Some(TAP_NAME)) {
        return Err(NetworkError::TapExists(netns.to_owned()));
    }
    let cni: Vec<&LinkMessage> = links
        .iter()
        .filter(|l| l.header.link_layer_type != LinkLayerType::Loopback)
        .collect();
    let link = match cni.as_slice() {
        [] => return Ok(None),
        [one] => *one,
        many => {
            let names: Vec<_> = many.iter().filter_map(|l| link_name(l)).collect();
            return Err(NetworkError::Interfaces(netns.to_owned(), names.join(", ")));
        }
    };
    let index = link.header.index;
    let name = link_name(link).unwrap_or_default().to_owned();
    let mut interface = Interface {
        name: name.clone(),
        mac: [0; 6],
        mtu: 1500,
        addresses: Vec::new(),
    };
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::Address(mac) if mac.len() == 6 => interface.mac.copy_from_slice(mac),
            LinkAttribute::Mtu(mtu) => interface.mtu = *mtu,
            _ => {}
        }
    }

    let addresses: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(netlink(format!("list the addresses of {name}")))?;
    for address in addresses {
        let ip = address.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let ip = ip.or_else(|| {
            address.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        match ip {
            Some(IpAddr::V4(v4)) => interface.addresses.push(Ipv4Net {
                address: v4,
                prefix_len: address.header.prefix_len,
            }),
            Some(IpAddr::V6(v6)) if (v6.segments()[0] & 0xffc0) != 0xfe80 => {
                warn!(interface = %name, address = %v6, "IPv6 address left out: the guest kernel has no IPv6");
            }
            _ => {}
        }
    }

    let routes: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(netlink("list the routes"))?;
    let routes = routes
        .iter()
        .filter(|r| {
            r.header.table == MAIN_TABLE
                && r.header.kind == RouteType::Unicast
                && r.header.address_family == AddressFamily::Inet
                // The kernel's own routes (an address's subnet) come back with the address.
                && r.header.protocol != RouteProtocol::Kernel
                && r.attributes.contains(&RouteAttribute::Oif(index))
        })
        .map(route_of)
        .collect();

    let tap = open_tap(TAP_NAME).map_err(NetworkError::Tap)?;
    let tap_index = link_index(handle, TAP_NAME)
        .await
        .map_err(netlink(format!("find {TAP_NAME}")))?
        .ok_or_else(|| NetworkError::Tap(io::Error::other("the new tap has no index")))?;
    if let Err(e) = redirect(handle, index, tap_index, &interface).await {
        remove_ingress(handle, index).await;
        return Err(e);
    }
    Ok(Some((tap, interface, routes)))
}

fn route_of(route: &RouteMessage) -> Route {
    let v4 = |a: &RouteAddress| match a {
        RouteAddress::Inet(ip) => Some(*ip),
        _ => None,
    };
    let mut out = Route {
        destination: None,
        gateway: None,
        source: None,
        scope: route.header.scope.into(),
    };
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Destination(a) => {
                out.destination = v4(a).map(|address| Ipv4Net {
                    address,
                    prefix_len: route.header.destination_prefix_length,
                })
            }
            RouteAttribute::Gateway(a) => out.gateway = v4(a),
            RouteAttribute::PrefSource(a) => out.source = v4(a),
            _ => {}
        }
    }
    out
}

/// The tap up with the interface's MTU; an ingress qdisc on both, each redirecting every
/// frame to the other's egress.
async fn redirect(
    handle: &Handle,
    index: u32,
    tap_index: u32,
    interface: &Interface,
) -> Result<(), NetworkError> {
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(tap_index)
                .mtu(interface.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(netlink(format!("bring {TAP_NAME} up")))?;
    for (from, to, from_name, to_name) in [
        (index, tap_index, interface.name.as_str(), TAP_NAME),
        (tap_index, index, TAP_NAME, interface.name.as_str()),
    ] {
        handle
            .qdisc()
            .add(from as i32)
            .ingress()
            .execute()
            .await
            .map_err(netlink(format!("add an ingress qdisc to {from_name}")))?;
        handle
            .traffic_filter(from as i32)
            .add()
            .parent(INGRESS_PARENT)
            .protocol(PROTOCOL_ALL)
            .redirect(to)
            .map_err(netlink(format!(
                "build the redirect {from_name} → {to_name}"
            )))?
            .execute()
            .await
            .map_err(netlink(format!("redirect {from_name} → {to_name}")))?;
    }
    Ok(())
}

/// Removes the ingress qdisc (and its filter) from interface `index`; logs a failure.
async fn remove_ingress(handle: &Handle, index: u32) {
    let mut del = handle.qdisc().del(index as i32);
    del.message_mut().header.parent = rtnetlink::packet_route::tc::TcHandle::INGRESS;
    del.message_mut().header.handle = rtnetlink::packet_route::tc::TcHandle::from(INGRESS_PARENT);
    if let Err(e) = del.execute().await {
        warn!(index, error = %e, "cannot remove the ingress qdisc");
    }
}

/// Undoes [`connect`] on interface `name` of `netns`: removes the ingress qdiscs (and their
/// filters) of the interface and of the tap, if the tap is still there (it goes away with
/// the VMM's descriptor). A namespace or interface that is gone already (CNI removed it) is
/// no error.
pub fn disconnect(netns: &Path, name: &str) {
    if !netns.exists() {
        return;
    }
    let name = name.to_owned();
    let done = in_netns(netns, move |handle| {
        Box::pin(async move {
            for name in [name.as_str(), TAP_NAME] {
                if let Ok(Some(index)) = link_index(&handle, name).await {
                    remove_ingress(&handle, index).await;
                }
            }
            Ok(())
        })
    });
    if let Err(e) = done {
        warn!(netns = %netns.display(), error = %e, "cannot disconnect the pod's network");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tc_gets_eth_p_all_in_network_byte_order() {
        assert_eq!(PROTOCOL_ALL.to_ne_bytes(), [0x00, 0x03]);
    }

    #[test]
    fn macs_are_formatted_as_the_vmm_takes_them() {
        assert_eq!(
            format_mac(&[0x02, 0x68, 0x75, 0x73, 0x6b, 0x0a]),
            "02:68:75:73:6b:0a"
        );
    }

    /// The shim's own network namespace (the host's) is never connected: its interface would
    /// be taken from the host.
    #[test]
    fn the_hosts_namespace_is_refused() {
        let err = connect(Path::new("/proc/self/ns/net")).unwrap_err();
        assert!(matches!(err, NetworkError::HostNamespace(_)), "{err}");
    }

    #[test]
    fn a_missing_namespace_is_an_error() {
        let err = connect(Path::new("/nonexistent/netns")).unwrap_err();
        assert!(matches!(err, NetworkError::Namespace(..)), "{err}");
    }

    /// A new network namespace, held by its descriptor (it lives as long as the file).
    fn new_netns() -> File {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("a network namespace of the test's own (needs root)");
            File::open("/proc/thread-self/ns/net").expect("the new namespace")
        })
        .join()
        .unwrap()
    }

    fn path_of(ns: &File) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", ns.as_raw_fd()))
    }

    /// Runs netlink `work` in `ns`.
    fn netlink_in<F>(ns: &File, work: F)
    where
        F: FnOnce(Handle) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>
            + Send
            + 'static,
    {
        in_netns(&path_of(ns), move |handle| {
            Box::pin(async move {
                work(handle).await;
                Ok(())
            })
        })
        .unwrap();
    }

    async fn index_of(handle: &Handle, name: &str) -> u32 {
        link_index(handle, name).await.unwrap().expect(name)
    }

    /// A raw packet socket on `wire0` of `ns`.
    fn packet_socket(ns: &File) -> OwnedFd {
        let ns = ns.try_clone().unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let protocol = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2); the descriptor is owned right away.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol.into()) };
            assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
            // SAFETY: fd is a new descriptor nothing else owns.
            let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain old data; zeroes are a valid value.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = protocol;
            // SAFETY: a NUL-terminated name.
            addr.sll_ifindex = unsafe { libc::if_nametoindex(c"wire0".as_ptr()) } as i32;
            // SAFETY: addr outlives the call and its size is given.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    std::ptr::addr_of!(addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
            fd
        })
        .join()
        .unwrap()
    }

    /// Reads `fd` until a frame carrying `payload` arrives (true) or 2 s pass (false).
    fn sees(fd: &OwnedFd, payload: &[u8]) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut buf = vec![0u8; 65_536];
        while std::time::Instant::now() < deadline {
            let mut pfd = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(fd),
                nix::poll::PollFlags::POLLIN,
            )];
            if nix::poll::poll(&mut pfd, 100u16).unwrap_or(0) == 0 {
                continue;
            }
            let n = nix::unistd::read(fd.as_raw_fd(), &mut buf).unwrap();
            if buf[..n].windows(payload.len()).any(|w| w == payload) {
                return true;
            }
        }
        false
    }

    const ETH0_MAC: [u8; 6] = [0x02, 0x68, 0x75, 0x73, 0x6b, 0x0a];

    fn frame(dst: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut frame = dst.to_vec();
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x77]);
        // The local experimental ethertype: nothing in either namespace answers it.
        frame.extend_from_slice(&[0x88, 0xb5]);
        frame.extend_from_slice(payload);
        frame.resize(frame.len().max(60), 0);
        frame
    }

    /// A CNI-like setup (a veth whose `eth0` end is in the pod's namespace, with an address,
    /// an MTU and a default route; its `wire0` end outside, where a bridge would be):
    /// [`connect`] reads the interface and its route, and joins `eth0` and the tap both ways;
    /// [`disconnect`] parts them again. Needs root (as every test host here has).
    #[test]
    fn the_cni_interface_and_the_tap_are_joined_both_ways() {
        let pod = new_netns();
        let wire = new_netns();
        let pod_fd = pod.as_raw_fd();
        netlink_in(&wire, move |h| {
            Box::pin(async move {
                h.link()
                    .add(rtnetlink::LinkVeth::new("wire0", "eth0").build())
                    .execute()
                    .await
                    .unwrap();
                let eth0 = index_of(&h, "eth0").await;
                h.link()
                    .set(LinkUnspec::new_with_index(eth0).setns_by_fd(pod_fd).build())
                    .execute()
                    .await
                    .unwrap();
                let wire0 = index_of(&h, "wire0").await;
                h.link()
                    .set(LinkUnspec::new_with_index(wire0).up().build())
                    .execute()
                    .await
                    .unwrap();
            })
        });
        netlink_in(&pod, |h| {
            Box::pin(async move {
                let eth0 = index_of(&h, "eth0").await;
                h.link()
                    .set(
                        LinkUnspec::new_with_index(eth0)
                            .address(ETH0_MAC.to_vec())
                            .mtu(1400)
                            .up()
                            .build(),
                    )
                    .execute()
                    .await
                    .unwrap();
                h.address()
                    .add(eth0, IpAddr::V4(Ipv4Addr::new(10, 99, 0, 2)), 24)
                    .execute()
                    .await
                    .unwrap();
                h.route()
                    .add(
                        RouteMessageBuilder::<Ipv4Addr>::new()
                            .gateway(Ipv4Addr::new(10, 99, 0, 1))
                            .output_interface(eth0)
                            .build(),
                    )
                    .execute()
                    .await
                    .unwrap();
            })
        });

        let net = connect(&path_of(&pod)).unwrap().expect("eth0 is found");
        assert_eq!(
            net.interface,
            Interface {
                name: "eth0".into(),
                mac: ETH0_MAC,
                mtu: 1400,
                addresses: vec![Ipv4Net {
                    address: Ipv4Addr::new(10, 99, 0, 2),
                    prefix_len: 24
                }],
            }
        );
        assert_eq!(
            net.routes,
            vec![Route {
                destination: None,
                gateway: Some(Ipv4Addr::new(10, 99, 0, 1)),
                source: None,
                scope: 0,
            }]
        );

        let outside = packet_socket(&wire);
        let send_from_guest = |payload: &[u8]| {
            let mut bytes = vec![0u8; VNET_HDR_SIZE as usize];
            bytes.extend(frame([0xff; 6], payload));
            nix::unistd::write(&net.tap, &bytes).unwrap();
        };
        send_from_guest(b"guest-to-wire");
        assert!(
            sees(&outside, b"guest-to-wire"),
            "a frame the VM writes to the tap does not leave through eth0"
        );
        nix::unistd::write(&outside, &frame(ETH0_MAC, b"wire-to-guest")).unwrap();
        assert!(
            sees(&net.tap, b"wire-to-guest"),
            "a frame arriving on eth0 does not reach the VM's tap"
        );

        disconnect(&path_of(&pod), "eth0");
        send_from_guest(b"after-disconnect");
        assert!(
            !sees(&outside, b"after-disconnect"),
            "the tap still sends through eth0 after disconnect"
        );
        nix::unistd::write(&outside, &frame(ETH0_MAC, b"after-disconnect")).unwrap();
        assert!(
            !sees(&net.tap, b"after-disconnect"),
            "eth0 still sends to the tap after disconnect"
        );
    }
}

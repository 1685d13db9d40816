//! The pod's network interface and routes in the guest: `UpdateInterface` and `UpdateRoutes`.
//!
//! The shim connects the CNI interface of the pod's network namespace on the host to the VM's
//! virtio-net device, whose MAC is the CNI interface's, and hands the agent that interface's
//! configuration. The agent finds the guest's interface by that MAC (the name the guest kernel
//! gave it is an accident of probe order), brings it down, renames it to the CNI name (the
//! kernel renames only a link that is down), sets its MTU, adds its addresses and brings it up;
//! the kernel then adds the prefix route of each address. `UpdateRoutes` adds the remaining
//! routes: the routes on the link first, then those with a gateway, so the gateway of
//! `default via 10.88.7.1 dev eth0` is already reachable on the link when that route is added.
//! A route or an address that already exists (EEXIST, e.g. a link route the kernel added for an
//! address) is not an error. If adding a route fails, the routes this call added are deleted
//! again, so the routes are all added or none.
//!
//! Every field of a request is checked before anything changes, so a bad request leaves the
//! guest's network as it was. Only IPv4: the guest kernel is built without IPv6.
//!
//! The agent is PID 1 in the guest's root network namespace, which is the pod's (the shim
//! drops the host's namespace paths from the specs), so it talks rtnetlink on a socket of its
//! own, opened per request and closed with it.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use futures_util::TryStreamExt as _;
use husk_agent_api::agent::{Interface, Route, UpdateInterfaceRequest, UpdateRoutesRequest};
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::route::{RouteMessage, RouteScope};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tracing::{debug, info, warn};

/// `IFNAMSIZ` - 1: the longest interface name the kernel accepts.
const MAX_NAME_LEN: usize = 15;
/// The smallest MTU of an IPv4 link (RFC 791).
const MIN_MTU: u32 = 68;
/// The largest MTU the agent accepts (an IPv4 datagram's largest size). The kernel refuses an
/// MTU above the device's maximum: for virtio-net, the MTU the VMM offers (`--net-mtu`).
const MAX_MTU: u32 = 65535;
/// How long `UpdateInterface` waits for an interface with the MAC to appear (the virtio-net
/// device may still be probing when the shim asks).
const FIND_TIMEOUT: Duration = Duration::from_secs(2);
/// How often it looks while it waits.
const FIND_INTERVAL: Duration = Duration::from_millis(100);

/// Errors of `UpdateInterface` and `UpdateRoutes`.
#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    /// The request has no interface
    #[error("UpdateInterface has no interface")]
    NoInterface,
    /// An invalid interface name
    #[error("Invalid interface name {0:?}: {1}")]
    Name(String, &'static str),
    /// An invalid MAC address
    #[error("Invalid MAC address {0:?}: expected a unicast address xx:xx:xx:xx:xx:xx")]
    Mac(String),
    /// An MTU out of range
    #[error("Invalid MTU {0}: expected {MIN_MTU} to {MAX_MTU}, or 0 to leave it as is")]
    Mtu(u32),
    /// An invalid address of the interface
    #[error("Invalid address {0:?}/{1}: {2}")]
    Address(String, u32, &'static str),
    /// An IPv6 address of the interface
    #[error("Address {0:?} is {NO_IPV6}")]
    Ipv6(String),
    /// An invalid route
    #[error("Invalid route {0}: {1}")]
    Route(String, String),
    /// Cannot open the netlink socket
    #[error("Cannot open a netlink socket")]
    Connect(#[source] io::Error),
    /// Cannot list the interfaces
    #[error("Cannot list the network interfaces")]
    List(#[source] io::Error),
    /// No interface has the MAC address
    #[error(
        "No network interface has the MAC address {mac} after {waited:.1?} (interfaces: {seen})"
    )]
    NoSuchMac {
        /// The MAC address asked for.
        mac: String,
        /// How long the agent waited for it.
        waited: Duration,
        /// The interfaces there are, `name mac` each.
        seen: String,
    },
    /// A step of configuring the interface failed
    #[error("Cannot {0} (interface {1}, MAC {2})")]
    Link(String, String, String, #[source] io::Error),
    /// The device of a route does not exist
    #[error("Route {0}: no interface {1:?}")]
    NoSuchDevice(String, String),
    /// Cannot look a route's device up
    #[error("Route {0}: cannot look interface {1:?} up")]
    Device(String, String, #[source] io::Error),
    /// Cannot add a route
    #[error("Cannot add route {0}")]
    AddRoute(String, #[source] io::Error),
}

impl IfaceError {
    /// The ttrpc status code of the error.
    pub fn code(&self) -> ttrpc::Code {
        match self {
            Self::NoInterface
            | Self::Name(..)
            | Self::Mac(_)
            | Self::Mtu(_)
            | Self::Address(..)
            | Self::Ipv6(_)
            | Self::Route(..) => ttrpc::Code::INVALID_ARGUMENT,
            Self::NoSuchMac { .. } | Self::NoSuchDevice(..) => ttrpc::Code::NOT_FOUND,
            Self::Connect(_)
            | Self::List(_)
            | Self::Link(..)
            | Self::Device(..)
            | Self::AddRoute(..) => ttrpc::Code::INTERNAL,
        }
    }
}

/// A checked `Interface`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    /// The name the interface gets.
    pub name: String,
    /// Its MAC address, by which the agent finds it.
    pub mac: [u8; 6],
    /// Its MTU; `None` leaves it as is.
    pub mtu: Option<u32>,
    /// Its addresses and their prefix lengths.
    pub addresses: Vec<(Ipv4Addr, u8)>,
}

/// A checked `Route`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Destination and prefix length; `None` for the default route.
    pub destination: Option<(Ipv4Addr, u8)>,
    /// Next hop; `None` for a route on the link.
    pub gateway: Option<Ipv4Addr>,
    /// Preferred source address (`RTA_PREFSRC`, `ip route ... src`).
    pub source: Option<Ipv4Addr>,
    /// The interface's name.
    pub device: String,
    /// `RT_SCOPE_*`.
    pub scope: u8,
}

/// As `ip route` prints it: `10.88.7.0/24 dev eth0 scope 253`, `default via 10.88.7.1 dev eth0`.
impl fmt::Display for RouteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.destination {
            Some((addr, len)) => write!(f, "{addr}/{len}")?,
            None => f.write_str("default")?,
        }
        if let Some(gateway) = self.gateway {
            write!(f, " via {gateway}")?;
        }
        write!(f, " dev {}", self.device)?;
        if let Some(source) = self.source {
            write!(f, " src {source}")?;
        }
        if self.scope != 0 {
            write!(f, " scope {}", self.scope)?;
        }
        Ok(())
    }
}

/// Checks an interface name as the kernel's `dev_valid_name` does.
pub fn check_name(name: &str) -> Result<(), IfaceError> {
    let refuse = |why| Err(IfaceError::Name(name.to_owned(), why));
    if name.is_empty() {
        return refuse("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return refuse("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return refuse("not a name");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        return refuse("contains '/', ':', NUL or whitespace");
    }
    Ok(())
}

/// Parses a unicast MAC address `xx:xx:xx:xx:xx:xx` (hex, either case).
pub fn parse_mac(mac: &str) -> Result<[u8; 6], IfaceError> {
    let bad = || IfaceError::Mac(mac.to_owned());
    let mut bytes = [0u8; 6];
    let mut parts = mac.split(':');
    for byte in &mut bytes {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    // All zeroes is `lo`'s; the low bit of the first byte marks a multicast address.
    if parts.next().is_some() || bytes == [0; 6] || bytes[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(bytes)
}

/// `xx:xx:xx:xx:xx:xx`.
fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Why the guest has no IPv6, for the errors.
const NO_IPV6: &str = "IPv6: the guest kernel has no IPv6, only IPv4 is supported";

/// Parses an IPv4 address; `Err(true)` when `text` is an IPv6 address, `Err(false)` when it is
/// no address.
fn parse_ipv4(text: &str) -> Result<Ipv4Addr, bool> {
    text.parse::<Ipv4Addr>()
        .map_err(|_| text.parse::<Ipv6Addr>().is_ok())
}

/// Checks `Interface` without side effects.
pub fn parse_interface(iface: &Interface) -> Result<InterfaceConfig, IfaceError> {
    check_name(&iface.name)?;
    let mac = parse_mac(&iface.mac)?;
    let mtu = match iface.mtu {
        0 => None,
        mtu if (MIN_MTU..=MAX_MTU).contains(&mtu) => Some(mtu),
        mtu => return Err(IfaceError::Mtu(mtu)),
    };
    let mut addresses = Vec::with_capacity(iface.addresses.len());
    for a in &iface.addresses {
        let refuse = |why| IfaceError::Address(a.address.clone(), a.prefix_len, why);
        let addr = parse_ipv4(&a.address).map_err(|ipv6| {
            if ipv6 {
                IfaceError::Ipv6(a.address.clone())
            } else {
                refuse("not an IPv4 address")
            }
        })?;
        let prefix_len = u8::try_from(a.prefix_len)
            .ok()
            .filter(|len| *len <= 32)
            .ok_or_else(|| refuse("the prefix length is more than 32"))?;
        if addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() {
            return Err(refuse("not a unicast address"));
        }
        addresses.push((addr, prefix_len));
    }
    Ok(InterfaceConfig {
        name: iface.name.clone(),
        mac,
        mtu,
        addresses,
    })
}

/// Checks one `Route` without side effects.
fn parse_route(route: &Route) -> Result<RouteConfig, IfaceError> {
    // The route as given, for the errors.
    let given = || {
        format!(
            "{{destination {:?}, gateway {:?}, source {:?}, device {:?}, scope {}}}",
            route.destination, route.gateway, route.source, route.device, route.scope
        )
    };
    let refuse = |why: String| IfaceError::Route(given(), why);
    let ipv4 = |what: &str, text: &str| {
        parse_ipv4(text).map_err(|ipv6| {
            let why = if ipv6 { NO_IPV6 } else { "not an IPv4 address" };
            refuse(format!("the {what} {text:?} is {why}"))
        })
    };
    let destination = if route.destination.is_empty() {
        None
    } else {
        let (addr, len) = route
            .destination
            .split_once('/')
            .ok_or_else(|| refuse("the destination is not a.b.c.d/len".into()))?;
        let addr = ipv4("destination", addr)?;
        // Digits only, no leading zero: "/024" or "/+24" are refused.
        let len = len
            .parse::<u8>()
            .ok()
            .filter(|n| *n <= 32 && n.to_string() == len)
            .ok_or_else(|| refuse("the destination's prefix length is not 0 to 32".into()))?;
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        if u32::from(addr) & !mask != 0 {
            // The kernel refuses it too ("Invalid prefix for given prefix length").
            return Err(refuse(format!(
                "the destination has host bits set (the network is {}/{len})",
                Ipv4Addr::from(u32::from(addr) & mask)
            )));
        }
        // 0.0.0.0/0 is the default route, as an empty destination.
        (len != 0).then_some((addr, len))
    };
    let gateway = match route.gateway.as_str() {
        "" => None,
        text => Some(ipv4("gateway", text)?),
    };
    let source = match route.source.as_str() {
        "" => None,
        text => Some(ipv4("source", text)?),
    };
    check_name(&route.device).map_err(|e| refuse(e.to_string()))?;
    let scope = u8::try_from(route.scope)
        .map_err(|_| refuse(format!("scope {} is more than 255", route.scope)))?;
    Ok(RouteConfig {
        destination,
        gateway,
        source,
        device: route.device.clone(),
        scope,
    })
}

/// Checks every `Route` without side effects.
pub fn parse_routes(routes: &[Route]) -> Result<Vec<RouteConfig>, IfaceError> {
    routes.iter().map(parse_route).collect()
}

/// A netlink error as the `io::Error` of its errno (rtnetlink's own text adds nothing).
fn nl_error(err: rtnetlink::Error) -> io::Error {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        other => io::Error::other(other),
    }
}

fn is_errno(err: &io::Error, errno: i32) -> bool {
    err.raw_os_error() == Some(errno)
}

/// Opens an rtnetlink socket in the caller's network namespace (the guest's). The connection
/// task ends when the returned handle, and every clone of it, is dropped.
fn connect() -> Result<Handle, IfaceError> {
    // The third part is the stream of unsolicited messages; dropping it at once lets the
    // connection end with the handle.
    let (connection, handle, _) = rtnetlink::new_connection().map_err(IfaceError::Connect)?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Every link's message (index, name, hardware address, ...).
async fn links(handle: &Handle) -> Result<Vec<LinkMessage>, IfaceError> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| IfaceError::List(nl_error(e)))
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

fn link_mac(link: &LinkMessage) -> Option<&[u8]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(mac) => Some(mac.as_slice()),
        _ => None,
    })
}

/// The index and name of the Ethernet link with MAC `mac`, waiting up to [`FIND_TIMEOUT`] for
/// it to appear.
async fn find_by_mac(handle: &Handle, mac: &[u8; 6]) -> Result<(u32, String), IfaceError> {
    let started = tokio::time::Instant::now();
    loop {
        let all = links(handle).await?;
        let found = all.iter().find(|link| {
            link.header.link_layer_type == LinkLayerType::Ether && link_mac(link) == Some(&mac[..])
        });
        if let Some(link) = found {
            return Ok((
                link.header.index,
                link_name(link).unwrap_or_default().to_owned(),
            ));
        }
        if started.elapsed() >= FIND_TIMEOUT {
            let seen = all
                .iter()
                .map(|link| {
                    format!(
                        "{} {}",
                        link_name(link).unwrap_or("?"),
                        link_mac(link).map(format_mac).unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            return Err(IfaceError::NoSuchMac {
                mac: format_mac(mac),
                waited: started.elapsed(),
                seen,
            });
        }
        tokio::time::sleep(FIND_INTERVAL).await;
    }
}

/// `UpdateInterface`: checks the request, finds the interface by its MAC, brings it down,
/// renames it, sets its MTU, adds its addresses and brings it up.
pub async fn update_interface(req: &UpdateInterfaceRequest) -> Result<(), IfaceError> {
    let iface = parse_interface(req.interface.as_ref().ok_or(IfaceError::NoInterface)?)?;
    let handle = connect()?;
    let mac = format_mac(&iface.mac);
    let (index, old_name) = find_by_mac(&handle, &iface.mac).await?;
    let failed = |what: String| {
        let (name, mac) = (iface.name.clone(), mac.clone());
        move |e| IfaceError::Link(what, name, mac, nl_error(e))
    };

    // RTM_SETLINK on the link's index; one change at a time, so an error says which failed.
    let set = |msg: LinkMessage| handle.link().set(msg).execute();
    set(LinkUnspec::new_with_index(index).down().build())
        .await
        .map_err(failed(format!("bring {old_name} down")))?;
    if old_name != iface.name {
        set(LinkUnspec::new_with_index(index)
            .name(iface.name.clone())
            .build())
        .await
        .map_err(failed(format!("rename {old_name} to {}", iface.name)))?;
    }
    if let Some(mtu) = iface.mtu {
        set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .await
            .map_err(failed(format!("set the MTU to {mtu}")))?;
    }
    for &(addr, len) in &iface.addresses {
        match handle
            .address()
            .add(index, addr.into(), len)
            .execute()
            .await
            .map_err(nl_error)
        {
            Ok(()) => {}
            Err(e) if is_errno(&e, libc::EEXIST) => {
                debug!(interface = %iface.name, address = %addr, "address already there");
            }
            Err(e) => {
                return Err(IfaceError::Link(
                    format!("add address {addr}/{len}"),
                    iface.name.clone(),
                    mac.clone(),
                    e,
                ))
            }
        }
    }
    set(LinkUnspec::new_with_index(index).up().build())
        .await
        .map_err(failed("bring the interface up".to_owned()))?;
    info!(
        interface = %iface.name,
        was = %old_name,
        mac = %mac,
        mtu = ?iface.mtu,
        addresses = ?iface.addresses,
        "interface configured"
    );
    Ok(())
}

/// The index of the link named `route.device`.
async fn device_index(handle: &Handle, route: &RouteConfig) -> Result<u32, IfaceError> {
    let found = handle
        .link()
        .get()
        .match_name(route.device.clone())
        .execute()
        .try_next()
        .await
        .map_err(nl_error);
    match found {
        Ok(Some(link)) => Ok(link.header.index),
        Err(e) if !is_errno(&e, libc::ENODEV) => Err(IfaceError::Device(
            route.to_string(),
            route.device.clone(),
            e,
        )),
        // The kernel answers a lookup by name with ENODEV.
        Ok(None) | Err(_) => Err(IfaceError::NoSuchDevice(
            route.to_string(),
            route.device.clone(),
        )),
    }
}

/// The `RTM_NEWROUTE` (and `RTM_DELROUTE`) message of a route on the link with `index`: main
/// table, protocol static, unicast.
fn route_message(route: &RouteConfig, index: u32) -> RouteMessage {
    let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .output_interface(index)
        .scope(RouteScope::from(route.scope));
    if let Some((addr, len)) = route.destination {
        msg = msg.destination_prefix(addr, len);
    }
    if let Some(gateway) = route.gateway {
        msg = msg.gateway(gateway);
    }
    if let Some(source) = route.source {
        // RTA_PREFSRC; `source_prefix` would be RTA_SRC, a source-specific route.
        msg = msg.pref_source(source);
    }
    msg.build()
}

/// `UpdateRoutes`: checks every route and finds every device, then adds the routes on a link,
/// then those with a gateway. On an error it deletes the routes it added.
pub async fn update_routes(req: &UpdateRoutesRequest) -> Result<(), IfaceError> {
    let mut routes = parse_routes(&req.routes)?;
    if routes.is_empty() {
        return Ok(());
    }
    // Stable: the routes of each kind stay in the order given.
    routes.sort_by_key(|route| route.gateway.is_some());
    let handle = connect()?;
    let mut messages = Vec::with_capacity(routes.len());
    for route in &routes {
        messages.push(route_message(route, device_index(&handle, route).await?));
    }

    let mut added = Vec::new();
    for (route, msg) in routes.iter().zip(messages) {
        match handle
            .route()
            .add(msg.clone())
            .execute()
            .await
            .map_err(nl_error)
        {
            Ok(()) => added.push((route, msg)),
            Err(e) if is_errno(&e, libc::EEXIST) => {
                debug!(route = %route, "route already there");
            }
            Err(e) => {
                for (route, msg) in added.into_iter().rev() {
                    if let Err(e) = handle.route().del(msg).execute().await {
                        warn!(route = %route, error = %nl_error(e), "cannot delete route again");
                    }
                }
                return Err(IfaceError::AddRoute(route.to_string(), e));
            }
        }
    }
    info!(
        routes = %routes.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        "routes added"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use husk_agent_api::agent::IpAddress;

    use super::*;

    fn interface(name: &str, mac: &str, mtu: u32, addresses: &[(&str, u32)]) -> Interface {
        Interface {
            name: name.into(),
            mac: mac.into(),
            mtu,
            addresses: addresses
                .iter()
                .map(|(address, prefix_len)| IpAddress {
                    address: (*address).into(),
                    prefix_len: *prefix_len,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn route(destination: &str, gateway: &str, source: &str, device: &str, scope: u32) -> Route {
        Route {
            destination: destination.into(),
            gateway: gateway.into(),
            source: source.into(),
            device: device.into(),
            scope,
            ..Default::default()
        }
    }

    const MAC: &str = "02:42:0a:58:07:05";

    #[test]
    fn a_cni_interface_is_accepted() {
        let got = parse_interface(&interface(
            "eth0",
            "02:42:0A:58:07:05",
            1450,
            &[("10.88.7.5", 24)],
        ))
        .unwrap();
        assert_eq!(
            got,
            InterfaceConfig {
                name: "eth0".into(),
                mac: [0x02, 0x42, 0x0a, 0x58, 0x07, 0x05],
                mtu: Some(1450),
                addresses: vec![(Ipv4Addr::new(10, 88, 7, 5), 24)],
            }
        );
        let plain = parse_interface(&interface("net1", MAC, 0, &[])).unwrap();
        assert_eq!(plain.mtu, None, "0 leaves the MTU as is");
        assert!(plain.addresses.is_empty());
        assert_eq!(format_mac(&got.mac), MAC);
    }

    #[test]
    fn interface_names_are_checked() {
        for good in ["eth0", "a", "fifteen-bytes-x", "veth.100", "é"] {
            assert!(check_name(good).is_ok(), "{good:?} was refused");
        }
        for bad in [
            "",
            "sixteen-bytes-xx",
            ".",
            "..",
            "a/b",
            "eth0:1",
            "a b",
            "a\tb",
            "a\nb",
            "a\0b",
            "a\u{a0}b",
        ] {
            let e = parse_interface(&interface(bad, MAC, 0, &[])).unwrap_err();
            assert!(matches!(e, IfaceError::Name(..)), "{bad:?}: {e}");
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
        }
    }

    #[test]
    fn macs_are_checked() {
        for bad in [
            "",
            "02:42:0a:58:07",
            "02:42:0a:58:07:05:06",
            "02:42:0a:58:07:5",
            "02:42:0a:58:07:005",
            "02-42-0a-58-07-05",
            "02:42:0a:58:07:zz",
            "02:42:0a:58:07:+5",
            "02:42:0a:58:07:05:",
            "00:00:00:00:00:00",
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
        ] {
            let e = parse_interface(&interface("eth0", bad, 0, &[])).unwrap_err();
            assert!(matches!(e, IfaceError::Mac(_)), "{bad:?}: {e}");
        }
    }

    #[test]
    fn mtus_are_checked() {
        for good in [68, 1500, 9000, 65535] {
            assert_eq!(
                parse_interface(&interface("eth0", MAC, good, &[]))
                    .unwrap()
                    .mtu,
                Some(good)
            );
        }
        for bad in [1, 67, 65536, u32::MAX] {
            let e = parse_interface(&interface("eth0", MAC, bad, &[])).unwrap_err();
            assert!(matches!(e, IfaceError::Mtu(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn addresses_are_checked() {
        assert!(parse_interface(&interface("eth0", MAC, 0, &[("10.0.0.1", 32)])).is_ok());
        assert!(parse_interface(&interface("eth0", MAC, 0, &[("10.0.0.1", 0)])).is_ok());
        for (addr, len) in [
            ("10.0.0.1", 33),
            ("10.0.0.1", 256 + 24),
            ("10.0.0", 24),
            ("10.0.0.1/24", 24),
            ("", 24),
            ("example", 24),
            ("0.0.0.0", 8),
            ("224.0.0.1", 4),
            ("255.255.255.255", 32),
        ] {
            let e = parse_interface(&interface("eth0", MAC, 0, &[("10.0.0.2", 24), (addr, len)]))
                .unwrap_err();
            assert!(matches!(e, IfaceError::Address(..)), "{addr}/{len}: {e}");
        }
    }

    #[test]
    fn ipv6_is_refused_clearly() {
        let e = parse_interface(&interface("eth0", MAC, 0, &[("fd00::5", 64)])).unwrap_err();
        assert!(matches!(e, IfaceError::Ipv6(_)), "{e}");
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
        assert!(e.to_string().contains("no IPv6"), "{e}");
        for r in [
            route("fd00::/64", "", "", "eth0", 253),
            route("", "fd00::1", "", "eth0", 0),
            route("10.0.0.0/8", "", "fd00::5", "eth0", 253),
        ] {
            let e = parse_routes(&[r]).unwrap_err();
            assert!(matches!(e, IfaceError::Route(..)), "{e}");
            assert!(e.to_string().contains("no IPv6"), "{e}");
        }
    }

    #[test]
    fn a_cni_route_set_is_accepted() {
        let got = parse_routes(&[
            route("", "10.88.7.1", "", "eth0", 0),
            route("10.88.7.0/24", "", "10.88.7.5", "eth0", 253),
            route("0.0.0.0/0", "10.88.7.1", "", "eth0", 0),
        ])
        .unwrap();
        assert_eq!(
            got[1],
            RouteConfig {
                destination: Some((Ipv4Addr::new(10, 88, 7, 0), 24)),
                gateway: None,
                source: Some(Ipv4Addr::new(10, 88, 7, 5)),
                device: "eth0".into(),
                scope: 253,
            }
        );
        assert_eq!(got[0].destination, None, "empty is the default route");
        assert_eq!(got[2], got[0], "so is 0.0.0.0/0");
        assert_eq!(got[0].to_string(), "default via 10.88.7.1 dev eth0");
        assert_eq!(
            got[1].to_string(),
            "10.88.7.0/24 dev eth0 src 10.88.7.5 scope 253"
        );
        assert!(parse_routes(&[]).unwrap().is_empty());
        assert!(parse_routes(&[route("10.88.7.5/32", "", "", "eth0", 254)]).is_ok());
    }

    #[test]
    fn routes_are_checked() {
        for bad in [
            route("10.88.7.0", "", "", "eth0", 253),
            route("10.88.7.0/", "", "", "eth0", 253),
            route("10.88.7.0/33", "", "", "eth0", 253),
            route("10.88.7.0/024", "", "", "eth0", 253),
            route("10.88.7.0/+24", "", "", "eth0", 253),
            route("10.88.7.0/24/1", "", "", "eth0", 253),
            route("10.88.7.5/24", "", "", "eth0", 253),
            route("1.2.3.4/0", "", "", "eth0", 253),
            route("default", "10.88.7.1", "", "eth0", 0),
            route("10.88.7.0/24", "10.88.7", "", "eth0", 0),
            route("10.88.7.0/24", "", "nowhere", "eth0", 0),
            route("10.88.7.0/24", "", "", "", 253),
            route("10.88.7.0/24", "", "", "eth/0", 253),
            route("10.88.7.0/24", "", "", "sixteen-bytes-xx", 253),
            route("10.88.7.0/24", "", "", "eth0", 256),
        ] {
            let e =
                parse_routes(&[route("", "10.88.7.1", "", "eth0", 0), bad.clone()]).unwrap_err();
            assert!(matches!(e, IfaceError::Route(..)), "{bad:?}: {e}");
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
            assert!(
                e.to_string().contains(&format!("{:?}", bad.device)),
                "the error names the route: {e}"
            );
        }
    }

    #[test]
    fn link_routes_are_added_before_gateway_routes() {
        let mut routes = parse_routes(&[
            route("", "10.88.7.1", "", "eth0", 0),
            route("10.88.7.0/24", "", "", "eth0", 253),
            route("10.99.0.0/16", "10.88.7.1", "", "eth0", 0),
            route("10.88.8.0/24", "", "", "eth0", 253),
        ])
        .unwrap();
        routes.sort_by_key(|route| route.gateway.is_some());
        let order: Vec<_> = routes.iter().map(ToString::to_string).collect();
        assert_eq!(
            order,
            [
                "10.88.7.0/24 dev eth0 scope 253",
                "10.88.8.0/24 dev eth0 scope 253",
                "default via 10.88.7.1 dev eth0",
                "10.99.0.0/16 via 10.88.7.1 dev eth0",
            ]
        );
    }

    /// On the real kernel, in a fresh network namespace, with a tap for the virtio-net device:
    /// the interface is renamed and configured, routes go in in order, a failed route set
    /// leaves none behind. Needs root, /dev/net/tun and ip(8), as every test host here has
    /// (without them it fails, loudly); the CRI tests cover the real guest.
    #[test]
    fn configures_a_tap_in_a_fresh_namespace() {
        use std::process::Command;

        std::thread::spawn(|| {
            // This thread's namespace only; the child processes and the netlink socket,
            // created on this thread, are in it too. It goes away, tap and all, with the thread.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let ip = |args: &str| {
                let out = Command::new("ip")
                    .args(args.split(' '))
                    .output()
                    .expect("ip");
                assert!(out.status.success(), "ip {args}: {out:?}");
                String::from_utf8(out.stdout).unwrap()
            };
            ip("tuntap add dev tap7 mode tap");
            ip(&format!("link set tap7 address {MAC}"));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let req = UpdateInterfaceRequest {
                    interface: Some(interface("eth0", MAC, 1450, &[("10.88.7.5", 24)])).into(),
                    ..Default::default()
                };
                update_interface(&req).await.unwrap();
                // Again: the address is there already, the name is right.
                update_interface(&req).await.unwrap();
                let routes = |routes| UpdateRoutesRequest {
                    routes,
                    ..Default::default()
                };
                update_routes(&routes(vec![
                    route("", "10.88.7.1", "", "eth0", 0),
                    route("10.99.0.0/16", "10.88.7.1", "", "eth0", 0),
                    // The kernel's own prefix route already: EEXIST.
                    route("10.88.7.0/24", "", "10.88.7.5", "eth0", 253),
                ]))
                .await
                .unwrap();
                let e = update_routes(&routes(vec![
                    route("10.77.0.0/16", "", "", "eth0", 253),
                    route("10.66.0.0/16", "192.168.1.1", "", "eth0", 0),
                ]))
                .await
                .unwrap_err();
                assert!(matches!(e, IfaceError::AddRoute(..)), "{e}");
                assert!(
                    e.to_string().contains("10.66.0.0/16 via 192.168.1.1"),
                    "{e}"
                );
                let e = update_routes(&routes(vec![route("", "10.88.7.1", "", "eth9", 0)]))
                    .await
                    .unwrap_err();
                assert_eq!(e.code(), ttrpc::Code::NOT_FOUND, "{e}");
                let mut other = req.clone();
                other.interface.as_mut().unwrap().mac = "02:00:00:00:00:01".into();
                let e = update_interface(&other).await.unwrap_err();
                assert_eq!(e.code(), ttrpc::Code::NOT_FOUND, "{e}");
                assert!(e.to_string().contains("eth0 02:42:0a:58:07:05"), "{e}");
            });
            let link = ip("-o link show eth0");
            assert!(link.contains("mtu 1450") && link.contains(",UP"), "{link}");
            let addr = ip("-o -4 addr show dev eth0");
            assert!(addr.contains("inet 10.88.7.5/24 brd 10.88.7.255"), "{addr}");
            let routes = ip("-4 route show");
            for want in [
                "default via 10.88.7.1 dev eth0",
                "10.88.7.0/24 dev eth0 proto kernel scope link src 10.88.7.5",
                "10.99.0.0/16 via 10.88.7.1 dev eth0",
            ] {
                assert!(routes.contains(want), "{want:?} is missing:\n{routes}");
            }
            assert!(
                !routes.contains("10.77.0.0"),
                "not deleted again:\n{routes}"
            );
        })
        .join()
        .unwrap();
    }
}

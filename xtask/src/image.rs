//! The busybox OCI image of the end-to-end tests, built locally with no network.
//!
//! There is no image registry here (DESIGN.md "Host facts"), so the tests import an image
//! that xtask builds: the busybox root file system of `guest/testdata.rs` (Debian's
//! `busybox-static` and its applet links) packed as one uncompressed layer, an image config,
//! a manifest and an index, laid out as an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/…`) inside one tar archive that `ctr images import` accepts. The index names
//! the image with the `io.containerd.image.name` annotation containerd's importer reads.
//!
//! Every tar header is normalised (owner root, mtime 0, entries sorted), so the archive is a
//! pure function of the busybox binary; it is cached under the husk cache by its content.
//! `cargo xtask test` passes its path to the tests as `HUSK_TEST_IMAGE` (like the test
//! initramfs), and `cargo xtask bench ctr` imports the same archive.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::cache::{self, CacheKey};

/// The variable naming the image archive for the end-to-end tests.
pub const TEST_IMAGE_ENV: &str = "HUSK_TEST_IMAGE";
/// The name the image is imported under.
pub const TEST_IMAGE_NAME: &str = "docker.io/library/husk-busybox:test";
/// The same layer as a pod sandbox's image for containerd's CRI plugin (`sandbox_image`): its
/// command sleeps until the pod is stopped, which is all a pause container does in a pod
/// whose PID namespace it does not share.
pub const PAUSE_IMAGE_NAME: &str = "docker.io/library/husk-pause:test";
/// The pause image's command.
const PAUSE_CMD: &[&str] = &["sleep", "2147483647"];
/// Bump when the layout of the archive changes.
const RECIPE: &str = "oci-busybox-image-v2";

/// Media types (OCI image spec, `media-types.md`).
const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// The annotation containerd's importer takes the image name from.
const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The standard reference-name annotation (OCI image spec, `annotations.md`).
const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// `PATH` of the image config (the usual one of busybox images).
const IMAGE_PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A content-addressed blob of the layout.
#[derive(Debug, Clone)]
struct Blob {
    digest: String,
    data: Vec<u8>,
}

impl Blob {
    fn new(data: Vec<u8>) -> Self {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
        Blob { digest, data }
    }

    /// The OCI descriptor of this blob.
    fn descriptor(&self, media_type: &str) -> serde_json::Value {
        json!({ "mediaType": media_type, "digest": self.digest, "size": self.data.len() })
    }

    /// Its path inside the layout.
    fn path(&self) -> String {
        format!("blobs/{}", self.digest.replacen(':', "/", 1))
    }
}

/// Builds (or finds in the cache) the image archive and returns its path.
pub fn build_test_image() -> Result<PathBuf> {
    let rootfs = crate::guest::busybox_rootfs()?;
    let layer = layer_tar(&rootfs)?;
    let mut key = CacheKey::new(RECIPE);
    key.add("layer", &layer)
        .add("name", TEST_IMAGE_NAME.as_bytes())
        .add("pause", PAUSE_IMAGE_NAME.as_bytes())
        .add("pause-cmd", PAUSE_CMD.join(" ").as_bytes());
    let out = cache::cache_dir()?
        .join("test-image")
        .join(key.short())
        .join("husk-busybox.oci.tar");
    if !out.is_file() {
        let archive = image_archive(
            layer,
            &[(TEST_IMAGE_NAME, &["sh"]), (PAUSE_IMAGE_NAME, PAUSE_CMD)],
        )?;
        cache::write_atomically(&out, &archive, 0o644)?;
    }
    Ok(out)
}

/// The OCI image layout of one-layer images, each `(name, command)` on the same layer, as a
/// tar archive.
pub fn image_archive(layer: Vec<u8>, images: &[(&str, &[&str])]) -> Result<Vec<u8>> {
    let layer = Blob::new(layer);
    let mut blobs = vec![layer.clone()];
    let mut manifests = Vec::new();
    for (name, cmd) in images {
        let config = Blob::new(serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Env": [IMAGE_PATH_ENV], "Cmd": cmd, "WorkingDir": "/" },
            // Uncompressed layer: its diff id is its digest.
            "rootfs": { "type": "layers", "diff_ids": [layer.digest] },
            "history": [{ "created_by": "husk xtask: busybox-static rootfs" }],
        }))?);
        let manifest = Blob::new(serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": config.descriptor(MEDIA_TYPE_CONFIG),
            "layers": [layer.descriptor(MEDIA_TYPE_LAYER)],
        }))?);
        let tag = name.rsplit_once(':').map_or("latest", |(_, t)| t);
        let mut manifest_desc = manifest.descriptor(MEDIA_TYPE_MANIFEST);
        manifest_desc["platform"] = json!({ "architecture": "amd64", "os": "linux" });
        manifest_desc["annotations"] = json!({
            ANNOTATION_CONTAINERD_NAME: name,
            ANNOTATION_REF_NAME: tag,
        });
        manifests.push(manifest_desc);
        blobs.push(config);
        blobs.push(manifest);
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": manifests,
    }))?;

    let mut b = tar::Builder::new(Vec::new());
    append_file(
        &mut b,
        "oci-layout",
        0o644,
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    append_file(&mut b, "index.json", 0o644, &index)?;
    append_dir(&mut b, "blobs/")?;
    append_dir(&mut b, "blobs/sha256/")?;
    let mut written = std::collections::HashSet::new();
    for blob in &blobs {
        if written.insert(blob.digest.clone()) {
            append_file(&mut b, &blob.path(), 0o644, &blob.data)?;
        }
    }
    Ok(b.into_inner()?)
}

/// The layer: every entry of `root` (sorted, not following symlinks) with root ownership and
/// mtime 0. Only directories, regular files and symlinks are allowed.
pub fn layer_tar(root: &Path) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    append_tree(&mut b, root, "")?;
    Ok(b.into_inner()?)
}

fn append_tree(b: &mut tar::Builder<Vec<u8>>, dir: &Path, prefix: &str) -> Result<()> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("Cannot list {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let name = name
            .to_str()
            .with_context(|| format!("{} is not UTF-8", path.display()))?;
        let rel = format!("{prefix}{name}");
        let meta = fs::symlink_metadata(&path)?;
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&path)?;
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            b.append_link(&mut h, &rel, &target)?;
        } else if meta.is_dir() {
            let mut h = header(tar::EntryType::Directory, mode, 0);
            b.append_data(&mut h, format!("{rel}/"), std::io::empty())?;
            append_tree(b, &path, &format!("{rel}/"))?;
        } else if meta.is_file() {
            append_file(b, &rel, mode, &fs::read(&path)?)?;
        } else {
            bail!(
                "{} is neither a file, a directory nor a symlink",
                path.display()
            );
        }
    }
    Ok(())
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

fn append_file(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) -> Result<()> {
    let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
    b.append_data(&mut h, path, data)?;
    Ok(())
}

fn append_dir(b: &mut tar::Builder<Vec<u8>>, path: &str) -> Result<()> {
    let mut h = header(tar::EntryType::Directory, 0o755, 0);
    b.append_data(&mut h, path, std::io::empty())?;
    Ok(())
}

/// The `image` subcommand: builds the archive and prints `image=<path>` and `name=<name>`.
pub fn run() -> Result<()> {
    crate::setup::ensure()?;
    let path = build_test_image()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "image={}", path.display())?;
    writeln!(out, "name={TEST_IMAGE_NAME}")?;
    writeln!(out, "pause={PAUSE_IMAGE_NAME}")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::Read;

    fn members(archive: &[u8]) -> BTreeMap<String, (tar::EntryType, Vec<u8>, Option<String>)> {
        let mut a = tar::Archive::new(archive);
        let mut out = BTreeMap::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let link = e
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned());
            assert_eq!(e.header().mtime().unwrap(), 0, "{path}");
            assert_eq!(e.header().uid().unwrap(), 0, "{path}");
            let kind = e.header().entry_type();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.insert(path, (kind, data, link));
        }
        out
    }

    fn sample_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("bin")).unwrap();
        fs::write(dir.path().join("bin/busybox"), b"\x7fELF").unwrap();
        fs::set_permissions(
            dir.path().join("bin/busybox"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("busybox", dir.path().join("bin/sh")).unwrap();
        fs::create_dir(dir.path().join("tmp")).unwrap();
        dir
    }

    #[test]
    fn layer_keeps_files_links_and_modes_and_is_deterministic() {
        let dir = sample_tree();
        let layer = layer_tar(dir.path()).unwrap();
        assert_eq!(layer, layer_tar(dir.path()).unwrap(), "not deterministic");
        let m = members(&layer);
        let names: Vec<&str> = m.keys().map(String::as_str).collect();
        assert_eq!(names, ["bin/", "bin/busybox", "bin/sh", "tmp/"]);
        assert_eq!(m["bin/busybox"].1, b"\x7fELF");
        assert_eq!(m["bin/sh"].0, tar::EntryType::Symlink);
        assert_eq!(m["bin/sh"].2.as_deref(), Some("busybox"));
        let mut a = tar::Archive::new(&layer[..]);
        let e = a
            .entries()
            .unwrap()
            .map(Result::unwrap)
            .find(|e| e.path().unwrap().ends_with("busybox"))
            .unwrap();
        assert_eq!(e.header().mode().unwrap(), 0o755);
    }

    /// The layout is self-consistent: every descriptor's digest and size match its blob, and
    /// the index carries the name containerd's importer reads.
    #[test]
    fn layout_digests_sizes_and_name_agree() {
        let dir = sample_tree();
        let layer = layer_tar(dir.path()).unwrap();
        let archive = image_archive(
            layer.clone(),
            &[
                ("docker.io/library/x:t1", &["sh"]),
                ("docker.io/library/p:t2", &["sleep", "9"]),
            ],
        )
        .unwrap();
        let m = members(&archive);
        let blob = |desc: &serde_json::Value| -> Vec<u8> {
            let digest = desc["digest"].as_str().unwrap();
            let data = m[&format!("blobs/{}", digest.replacen(':', "/", 1))]
                .1
                .clone();
            assert_eq!(desc["size"].as_u64().unwrap(), data.len() as u64);
            assert_eq!(
                digest,
                format!("sha256:{}", hex::encode(Sha256::digest(&data)))
            );
            data
        };
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&m["oci-layout"].1).unwrap()
                ["imageLayoutVersion"],
            "1.0.0"
        );
        let index: serde_json::Value = serde_json::from_slice(&m["index.json"].1).unwrap();
        let desc = &index["manifests"][0];
        assert_eq!(desc["mediaType"], MEDIA_TYPE_MANIFEST);
        assert_eq!(
            desc["annotations"][ANNOTATION_CONTAINERD_NAME],
            "docker.io/library/x:t1"
        );
        assert_eq!(desc["annotations"][ANNOTATION_REF_NAME], "t1");
        let manifest: serde_json::Value = serde_json::from_slice(&blob(desc)).unwrap();
        let config: serde_json::Value = serde_json::from_slice(&blob(&manifest["config"])).unwrap();
        assert_eq!(blob(&manifest["layers"][0]), layer);
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            manifest["layers"][0]["digest"]
        );
        assert_eq!(config["os"], "linux");
        assert_eq!(config["config"]["Cmd"], serde_json::json!(["sh"]));
        // The second image shares the layer (one blob) and has its own command.
        let pause = &index["manifests"][1];
        assert_eq!(
            pause["annotations"][ANNOTATION_CONTAINERD_NAME],
            "docker.io/library/p:t2"
        );
        let manifest: serde_json::Value = serde_json::from_slice(&blob(pause)).unwrap();
        let config: serde_json::Value = serde_json::from_slice(&blob(&manifest["config"])).unwrap();
        assert_eq!(config["config"]["Cmd"], serde_json::json!(["sleep", "9"]));
        assert_eq!(blob(&manifest["layers"][0]), layer);
        let blobs = m
            .keys()
            .filter(|k| k.starts_with("blobs/sha256/") && !k.ends_with('/'))
            .count();
        assert_eq!(blobs, 5, "one layer, two configs, two manifests");
    }
}

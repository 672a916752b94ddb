//! Side effects the domain needs before it can be defined — the I/O half of conversion.
//! Call [`prepare`] after [`crate::pod::facts::probe`] and before defining the domain that
//! [`crate::convert::convert`] returned for the same VMI and facts; it creates exactly the files
//! that domain references:
//!
//! - containerDisk: qcow2 overlay `<ephemeral>/disk-data/<vol>/disk.qcow2` over
//!   `<container-disks>/disk_<index>.img` (backing format from the facts, else sniffed);
//! - ephemeral: qcow2 overlay over the PVC's `disk.img` (or block node), backing format raw;
//! - emptyDisk: sparse qcow2 of the requested capacity;
//! - hostDisk `DiskOrCreate`: sparse raw file of the requested capacity when missing;
//! - cloudInitNoCloud: ISO (volume id `cidata`: `meta-data`, `user-data`, `network-config`);
//! - cloudInitConfigDrive: ISO (volume id `config-2`: `openstack/latest/{meta_data.json,user_data,network_data.json}`);
//! - configMap / secret / downwardAPI / serviceAccount / sysprep: ISO of the mounted source directory
//!   (volume id = `volumeLabel` or `cfgdata`; sysprep: `unattendCD`, with an answer file).
//!
//! - changed-block tracking ([`cbt_overlays`], from the converted domain): the qcow2 overlay
//!   `<cbt_dir>/<volume>.qcow2` whose raw data file is the PVC, DataVolume or hostDisk itself.
//!
//! Existing overlays and images are kept (a restarted launcher in the same pod reuses them).
//! External tools: `qemu-img` and `xorrisofs`, looked up in `PATH`. Hot-plugged volumes are not
//! touched by [`prepare`] ([`cbt_overlays`] makes their overlays as they attach). Call it once;
//! it is not safe to run concurrently for one VMI.

use crate::convert::facts::{ImageFormat, PodFacts};
use crate::domain::{Disk, DiskSource};
use crate::pod::process::{Command, ProcessError};
use crate::spec::{CloudInitSource, VirtualMachineInstance};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("volume {volume}: {}: {source}", path.display())]
    Io {
        volume: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {volume}: {source}")]
    Tool {
        volume: String,
        #[source]
        source: ProcessError,
    },
    #[error("volume {volume}: {reason}")]
    Invalid { volume: String, reason: String },
}

fn io_err(volume: &str, path: &Path) -> impl FnOnce(std::io::Error) -> PrepareError {
    let volume = volume.to_string();
    let path = path.to_path_buf();
    move |source| PrepareError::Io {
        volume,
        path,
        source,
    }
}

fn run(volume: &str, tool: &'static str, args: &[&std::ffi::OsStr]) -> Result<(), PrepareError> {
    Command::new(tool)
        .args(args)
        .run()
        .map(drop)
        .map_err(|source| PrepareError::Tool {
            volume: volume.to_string(),
            source,
        })
}

fn mkparent(volume: &str, path: &Path) -> Result<(), PrepareError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(volume, parent))?;
    }
    Ok(())
}

fn overlay(
    volume: &str,
    overlay: &Path,
    base: &Path,
    format: ImageFormat,
) -> Result<(), PrepareError> {
    if overlay.exists() {
        return Ok(());
    }
    mkparent(volume, overlay)?;
    run(
        volume,
        "qemu-img",
        &[
            "create".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            format.as_str().as_ref(),
            "-b".as_ref(),
            base.as_os_str(),
            overlay.as_os_str(),
        ],
    )
}

/// KubeVirt's cluster size for a changed-block tracking overlay (virtwrap/storage/cbt.go).
const CBT_CLUSTER_SIZE: &str = "256k";

/// Creates the changed-block tracking overlay of every disk of `disks` that has one (a qcow2
/// source with a `<dataStore>`, as the converter emits it for a PVC, DataVolume or hostDisk
/// while `status.changedBlockTracking` is Initializing or Enabled) and whose overlay is not
/// there yet; an existing overlay is kept, with its bitmaps (KubeVirt's launcher likewise).
pub fn cbt_overlays<'a>(disks: impl IntoIterator<Item = &'a Disk>) -> Result<(), PrepareError> {
    for d in disks {
        let (Some(ds), DiskSource::File(overlay)) = (&d.data_store, &d.source) else {
            continue;
        };
        let (data, block) = match &ds.source {
            DiskSource::File(p) => (p, false),
            DiskSource::Block(p) => (p, true),
        };
        cbt_overlay(d.volume(), overlay, data, block)?;
    }
    Ok(())
}

/// One overlay, as KubeVirt's `createQCOW2OverlayFunc` makes it: qcow2, 256 KiB clusters, the
/// volume's size, the volume as its raw data file (`data-file-raw`: the volume stays a valid raw
/// image). KubeVirt runs `blockdev-create` in qemu-storage-daemon on the opened volume; `qemu-img
/// create -o data_file=<volume>` would recreate (empty) the volume instead. Here the overlay is
/// created over a scratch data file and then pointed at the volume by `qemu-img amend`, which
/// only rewrites the overlay's header: the volume's bytes are never written (tested in
/// tests/disk_features.rs with a volume holding data). Made under a temporary name and renamed,
/// so an interrupted start leaves no half-made overlay.
fn cbt_overlay(volume: &str, overlay: &Path, data: &Path, block: bool) -> Result<(), PrepareError> {
    if overlay.exists() {
        return Ok(());
    }
    mkparent(volume, overlay)?;
    // The volume's size: a block device's from its end, a file's from its length.
    let size = {
        use std::io::Seek;
        let mut f = std::fs::File::open(data).map_err(io_err(volume, data))?;
        if block {
            f.seek(std::io::SeekFrom::End(0))
                .map_err(io_err(volume, data))?
        } else {
            f.metadata().map_err(io_err(volume, data))?.len()
        }
    };
    let tmp = overlay.with_extension("qcow2.tmp");
    let scratch = overlay.with_extension("qcow2.scratch");
    for p in [&tmp, &scratch] {
        match std::fs::remove_file(p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(volume, p)(e)),
            _ => {}
        }
    }
    // qemu's option syntax: a comma in a value is doubled.
    let opt = |p: &Path| p.as_os_str().to_string_lossy().replace(',', ",,");
    let made = run(
        volume,
        "qemu-img",
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-o".as_ref(),
            format!(
                "data_file={},data_file_raw=on,cluster_size={CBT_CLUSTER_SIZE}",
                opt(&scratch)
            )
            .as_ref(),
            tmp.as_os_str(),
            size.to_string().as_ref(),
        ],
    )
    .and_then(|()| {
        run(
            volume,
            "qemu-img",
            &[
                "amend".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-o".as_ref(),
                format!("data_file={}", opt(data)).as_ref(),
                tmp.as_os_str(),
            ],
        )
    })
    .and_then(|()| std::fs::rename(&tmp, overlay).map_err(io_err(volume, overlay)));
    let _ = std::fs::remove_file(&scratch);
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made
}

/// The backing format of a containerDisk's overlay, from the base image's first bytes.
fn sniff(volume: &str, path: &Path) -> Result<ImageFormat, PrepareError> {
    let magic = crate::pod::image::sniff(path).map_err(io_err(volume, path))?;
    Ok(magic.disk_format())
}

fn make_iso(volume: &str, iso: &Path, volid: &str, dir: &Path) -> Result<(), PrepareError> {
    mkparent(volume, iso)?;
    let tmp = iso.with_extension("iso.tmp");
    run(
        volume,
        "xorrisofs",
        &[
            "-quiet".as_ref(),
            "-output".as_ref(),
            tmp.as_os_str(),
            "-volid".as_ref(),
            volid.as_ref(),
            "-joliet".as_ref(),
            "-rock".as_ref(),
            dir.as_os_str(),
        ],
    )?;
    std::fs::rename(&tmp, iso).map_err(io_err(volume, iso))
}

/// Standard base64 (RFC 4648 alphabet `+/`, as Kubernetes and KubeVirt encode it), padding
/// optional, whitespace (line breaks of a wrapped value) ignored. Anything else is an error:
/// a URL-safe `-`/`_`, data after the padding, a misplaced `=`.
pub fn decode_base64(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::Engine;
    const STANDARD_PADDING_OPTIONAL: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let compact: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    STANDARD_PADDING_OPTIONAL.decode(compact)
}

/// User data and network data of a cloud-init volume; `secretRef`s are read from the mounted
/// secret at `<config_dir>/secret/<volume>/` (keys `userdata`/`userData`, `networkdata`/`networkData`).
fn cloud_init_data(
    volume: &str,
    field: &str,
    c: &CloudInitSource,
    facts: &PodFacts,
) -> Result<(Vec<u8>, Option<Vec<u8>>), PrepareError> {
    let secret_dir = facts.paths.secret_source(volume);
    let read_key = |keys: &[&str]| -> Result<Option<Vec<u8>>, PrepareError> {
        for k in keys {
            let p = secret_dir.join(k);
            if p.exists() {
                // Kubernetes mounts secrets as symlinks into `..data/`: fine inside the
                // secret's directory, refused anywhere else (the data goes to the guest).
                let real = confined(volume, &facts.paths.config_dir.join("secret"), &p)?;
                return std::fs::read(&real).map(Some).map_err(io_err(volume, &p));
            }
        }
        Ok(None)
    };
    let b64 = |s: &str, what: &str| {
        decode_base64(s).map_err(|e| PrepareError::Invalid {
            volume: volume.to_string(),
            reason: format!("{field}.{what}: not valid base64 (standard alphabet): {e}"),
        })
    };
    let user = if let Some(u) = &c.user_data {
        u.clone().into_bytes()
    } else if let Some(u) = &c.user_data_base64 {
        b64(u, "userDataBase64")?
    } else if c.secret_ref.is_some() {
        read_key(&["userdata", "userData"])?.ok_or_else(|| PrepareError::Invalid {
            volume: volume.to_string(),
            reason: format!("secretRef has no userdata key in {}", secret_dir.display()),
        })?
    } else {
        Vec::new()
    };
    let network = if let Some(n) = &c.network_data {
        Some(n.clone().into_bytes())
    } else if let Some(n) = &c.network_data_base64 {
        Some(b64(n, "networkDataBase64")?)
    } else if c.network_data_secret_ref.is_some() {
        read_key(&["networkdata", "networkData"])?
    } else {
        None
    };
    Ok((user, network))
}

/// `path` resolved, if it stays inside `base` (see [`crate::pod::facts::confine_existing`]).
fn confined(volume: &str, base: &Path, path: &Path) -> Result<PathBuf, PrepareError> {
    crate::pod::facts::confine_existing(base, path).map_err(|reason| PrepareError::Invalid {
        volume: volume.to_string(),
        reason: format!("{}: {reason}", path.display()),
    })
}

/// An ISO of a mounted source directory, which must not lead out of `base`. xorrisofs records
/// symlinks inside it as symlinks (it does not follow them), so their targets never reach the
/// guest.
fn make_confined_iso(
    volume: &str,
    iso: &Path,
    volid: &str,
    base: &Path,
    dir: &Path,
) -> Result<(), PrepareError> {
    let real = confined(volume, base, dir)?;
    make_iso(volume, iso, volid, &real)
}

fn write(volume: &str, path: &Path, data: &[u8]) -> Result<(), PrepareError> {
    mkparent(volume, path)?;
    std::fs::write(path, data).map_err(io_err(volume, path))
}

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Create the files the converted domain references (see the module docs).
pub fn prepare(vmi: &VirtualMachineInstance, facts: &PodFacts) -> Result<(), PrepareError> {
    let paths = &facts.paths;
    let hostname = vmi
        .spec
        .hostname
        .clone()
        .unwrap_or_else(|| vmi.metadata.name.clone());
    let instance_id = format!("{}.{}", vmi.metadata.name, vmi.namespace());
    // KubeVirt makes the one NoCloud ISO from the first cloudInitNoCloud volume; the others
    // are views of the same ISO.
    let first_nocloud = vmi
        .spec
        .volumes
        .iter()
        .position(|v| v.cloud_init_no_cloud.is_some());
    for (index, v) in vmi.spec.volumes.iter().enumerate() {
        if v.cloud_init_no_cloud.is_some() && Some(index) != first_nocloud {
            continue;
        }
        let name = v.name.as_str();
        if !crate::spec::is_dns1123_label(name) {
            return Err(PrepareError::Invalid {
                volume: name.to_string(),
                reason: "name is not a DNS-1123 label".into(),
            });
        }
        if v.container_disk.is_some() {
            let base = paths.container_disk(index);
            let fmt = match facts.image_formats.get(name) {
                Some(f) => *f,
                None => sniff(name, &base)?,
            };
            overlay(name, &paths.overlay(name), &base, fmt)?;
        } else if v.ephemeral.is_some() {
            let base = if facts.block_volumes.contains(name) {
                paths.pvc_block(name)
            } else {
                paths.pvc_image(name)
            };
            overlay(name, &paths.overlay(name), &base, ImageFormat::Raw)?;
        } else if let Some(e) = &v.empty_disk {
            let target = paths.empty_disk(name);
            if !target.exists() {
                let bytes = e
                    .capacity
                    .as_ref()
                    .and_then(|q| q.value().ok())
                    .ok_or_else(|| PrepareError::Invalid {
                        volume: name.to_string(),
                        reason: "emptyDisk.capacity is missing or invalid".into(),
                    })?;
                mkparent(name, &target)?;
                run(
                    name,
                    "qemu-img",
                    &[
                        "create".as_ref(),
                        "-f".as_ref(),
                        "qcow2".as_ref(),
                        target.as_os_str(),
                        bytes.to_string().as_ref(),
                    ],
                )?;
            }
        } else if let Some(h) = &v.host_disk {
            let host_disk = facts.paths.host_disk(name, &h.path);
            let p = host_disk.as_path();
            if h.disk_type == "DiskOrCreate" && !p.exists() {
                let bytes = h
                    .capacity
                    .as_ref()
                    .and_then(|q| q.value().ok())
                    .ok_or_else(|| PrepareError::Invalid {
                        volume: name.to_string(),
                        reason: "hostDisk.capacity is missing or invalid".into(),
                    })?;
                // Never through a symlink, never over an existing file (a dangling symlink
                // does not "exist" but must not be followed either).
                use std::os::unix::fs::OpenOptionsExt;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(p)
                    .map_err(io_err(name, p))?;
                f.set_len(bytes).map_err(io_err(name, p))?;
            }
        } else if let Some(c) = &v.cloud_init_no_cloud {
            let field = format!("spec.volumes[{index}].cloudInitNoCloud");
            let (user, network) = cloud_init_data(name, &field, c, facts)?;
            let dir = paths.private_dir.join("cloud-init-nocloud");
            let _ = std::fs::remove_dir_all(&dir);
            write(
                name,
                &dir.join("meta-data"),
                format!("instance-id: {instance_id}\nlocal-hostname: {hostname}\n").as_bytes(),
            )?;
            write(name, &dir.join("user-data"), &user)?;
            if let Some(n) = network {
                write(name, &dir.join("network-config"), &n)?;
            }
            make_iso(name, &paths.cloud_init_no_cloud_iso(), "cidata", &dir)?;
        } else if let Some(c) = &v.cloud_init_config_drive {
            let field = format!("spec.volumes[{index}].cloudInitConfigDrive");
            let (user, network) = cloud_init_data(name, &field, c, facts)?;
            let dir = paths.private_dir.join("cloud-init-configdrive");
            let _ = std::fs::remove_dir_all(&dir);
            let latest = dir.join("openstack/latest");
            let uuid = vmi
                .metadata
                .uid
                .clone()
                .unwrap_or_else(|| instance_id.clone());
            write(
                name,
                &latest.join("meta_data.json"),
                format!(
                    "{{\"uuid\":{},\"hostname\":{},\"name\":{}}}",
                    json_str(&uuid),
                    json_str(&hostname),
                    json_str(&vmi.metadata.name)
                )
                .as_bytes(),
            )?;
            write(name, &latest.join("user_data"), &user)?;
            if let Some(n) = network {
                write(name, &latest.join("network_data.json"), &n)?;
            }
            make_iso(name, &paths.cloud_init_config_drive_iso(), "config-2", &dir)?;
        } else if let Some(c) = &v.config_map {
            let label = c.volume_label.as_deref().unwrap_or("cfgdata");
            make_confined_iso(
                name,
                &paths.config_map_iso(name),
                label,
                &paths.config_dir.join("config-map"),
                &paths.config_map_source(name),
            )?;
        } else if v.sysprep.is_some() {
            // KubeVirt's config.CreateSysprepDisks: the answer file must be there; label
            // `unattendCD` (what Windows Setup looks for).
            let base = paths.config_dir.join("sysprep");
            let src = confined(name, &base, &paths.sysprep_source(name))?;
            let has_answer_file = std::fs::read_dir(&src)
                .map_err(io_err(name, &src))?
                .filter_map(Result::ok)
                .any(|e| {
                    let n = e.file_name().to_string_lossy().to_ascii_lowercase();
                    n == "autounattend.xml" || n == "unattend.xml"
                });
            if !has_answer_file {
                return Err(PrepareError::Invalid {
                    volume: name.to_string(),
                    reason: format!(
                        "the sysprep source {} holds neither autounattend.xml nor unattend.xml",
                        src.display()
                    ),
                });
            }
            make_iso(name, &paths.sysprep_iso(name), "unattendCD", &src)?;
        } else if let Some(s) = &v.secret {
            let label = s.volume_label.as_deref().unwrap_or("cfgdata");
            make_confined_iso(
                name,
                &paths.secret_iso(name),
                label,
                &paths.config_dir.join("secret"),
                &paths.secret_source(name),
            )?;
        } else if v.downward_api.is_some() {
            let base = paths.config_dir.join("downwardapi");
            let src = base.join(name);
            make_confined_iso(name, &paths.downward_api_iso(name), "cfgdata", &base, &src)?;
        } else if v.service_account.is_some() {
            make_iso(
                name,
                &paths.service_account_iso(),
                "cfgdata",
                &paths.service_account_dir,
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::facts::PodFacts;

    fn have(tool: &str) -> bool {
        Command::new(tool).arg("--version").output().is_ok()
    }

    #[test]
    fn base64_decodes() {
        let ok = |s| decode_base64(s).ok();
        assert_eq!(ok("aGVsbG8=").as_deref(), Some(&b"hello"[..]));
        assert_eq!(ok("aGVsbG8").as_deref(), Some(&b"hello"[..]));
        assert_eq!(ok("aGVs\nbG8=").as_deref(), Some(&b"hello"[..]));
        assert_eq!(ok("a*b"), None);
        // The standard alphabet only: `+/` decode, URL-safe `-_` do not.
        assert_eq!(ok("+/8=").as_deref(), Some(&[0xfb, 0xff][..]));
        assert_eq!(ok("-_8="), None);
        // Nothing after the padding is ignored.
        assert_eq!(ok("aGVsbG8=aGVsbG8="), None);
        assert_eq!(ok("aGk=!"), None);
        assert_eq!(ok("").as_deref(), Some(&b""[..]));
    }

    #[test]
    fn creates_nocloud_iso_and_empty_disk() {
        if !have("xorrisofs") || !have("qemu-img") {
            println!("xorrisofs or qemu-img missing; skipping");
            return;
        }
        let tmp = std::env::temp_dir().join(format!("vl-prepare-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let vmi = crate::spec::from_str(
            r#"{"apiVersion":"kubevirt.io/v1","kind":"VirtualMachineInstance","metadata":{"name":"p"},
               "spec":{"volumes":[
                 {"name":"ci","cloudInitNoCloud":{"userDataBase64":"I2Nsb3VkLWNvbmZpZwo="}},
                 {"name":"scratch","emptyDisk":{"capacity":"16Mi"}}]}}"#,
            "t",
        )
        .expect("vmi");
        let mut facts = PodFacts::defaults(&vmi);
        facts.paths.private_dir = tmp.join("private");
        facts.paths.ephemeral_disks_dir = tmp.join("ephemeral");
        prepare(&vmi, &facts).expect("prepare");
        let iso = std::fs::read(facts.paths.cloud_init_no_cloud_iso()).expect("iso written");
        assert_eq!(&iso[0x8001..0x8006], b"CD001", "ISO 9660 signature");
        assert!(
            iso.windows(6).any(|w| w == b"cidata" || w == b"CIDATA"),
            "volume id cidata"
        );
        let user = std::fs::read(facts.paths.private_dir.join("cloud-init-nocloud/user-data"))
            .expect("user-data");
        assert_eq!(user, b"#cloud-config\n");
        let img = std::fs::read(facts.paths.empty_disk("scratch")).expect("empty disk");
        assert_eq!(&img[..4], b"QFI\xfb");
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn missing_container_disk_names_volume() {
        let tmp = std::env::temp_dir().join(format!("vl-prepare-cd-{}", std::process::id()));
        let vmi = crate::spec::from_str(
            r#"{"apiVersion":"kubevirt.io/v1","kind":"VirtualMachineInstance","metadata":{"name":"p"},
               "spec":{"volumes":[{"name":"cd","containerDisk":{"image":"x"}}]}}"#,
            "t",
        )
        .expect("vmi");
        let mut facts = PodFacts::defaults(&vmi);
        facts.paths.container_disks_dir = tmp.join("none");
        let e = prepare(&vmi, &facts).unwrap_err().to_string();
        assert!(
            e.starts_with("volume cd: ") && e.contains("disk_0.img"),
            "{e}"
        );
    }

    #[test]
    fn bad_base64_names_the_field() {
        let tmp = std::env::temp_dir().join(format!("vl-prepare-b64-{}", std::process::id()));
        let vmi = crate::spec::from_str(
            r#"{"apiVersion":"kubevirt.io/v1","kind":"VirtualMachineInstance","metadata":{"name":"p"},
               "spec":{"volumes":[{"name":"disk","persistentVolumeClaim":{"claimName":"c"}},
                 {"name":"ci","cloudInitConfigDrive":{"userData":"x","networkDataBase64":"bmV0-_w=="}}]}}"#,
            "t",
        )
        .expect("vmi");
        let mut facts = PodFacts::defaults(&vmi);
        facts.paths.private_dir = tmp.join("private");
        facts.paths.ephemeral_disks_dir = tmp.join("ephemeral");
        let e = prepare(&vmi, &facts);
        let _ = std::fs::remove_dir_all(&tmp);
        let e = e.unwrap_err().to_string();
        assert!(
            e.starts_with(
                "volume ci: spec.volumes[1].cloudInitConfigDrive.networkDataBase64: not valid base64"
            ),
            "{e}"
        );
    }
}

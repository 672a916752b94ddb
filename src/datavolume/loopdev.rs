//! Loop devices for Block-mode claims (`losetup` from util-linux).

use std::path::{Path, PathBuf};

use crate::pod::process::{Command, ProcessError};

/// A loop device over a claim's `block.img`.
#[derive(Debug)]
pub struct LoopDevice {
    pub device: PathBuf,
    pub file: PathBuf,
    /// Attached by this launcher (and so detached by it); a device found already attached
    /// (another launcher, or one that died) is left alone.
    pub owned: bool,
}

/// The loop device already backed by `file`, if any.
fn find(file: &Path) -> Result<Option<PathBuf>, String> {
    let out = Command::new("losetup")
        .arg("--noheadings")
        .args(["--output", "NAME"])
        .arg("--associated")
        .arg(file)
        .run()
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("/dev/"))
        .map(PathBuf::from))
}

/// Attach `file` to a free loop device, or reuse the one it is attached to.
pub fn attach(file: &Path) -> Result<LoopDevice, String> {
    if let Some(device) = find(file)? {
        return Ok(LoopDevice {
            device,
            file: file.to_path_buf(),
            owned: false,
        });
    }
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(file)
        .run()
        .map_err(|e| e.to_string())?;
    let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !device.starts_with("/dev/") {
        return Err(format!(
            "losetup --find --show printed {device:?}, not a device"
        ));
    }
    Ok(LoopDevice {
        device: PathBuf::from(device),
        file: file.to_path_buf(),
        owned: true,
    })
}

/// Detach a device this launcher attached. While QEMU still holds it open the kernel detaches
/// it when QEMU closes it.
pub fn detach(dev: &LoopDevice) {
    if !dev.owned {
        return;
    }
    match Command::new("losetup")
        .arg("--detach")
        .arg(&dev.device)
        .run()
    {
        Ok(_) => {
            tracing::info!(device = %dev.device.display(), file = %dev.file.display(), "loop device detached")
        }
        Err(e @ ProcessError::Failed { .. }) => tracing::warn!(
            device = %dev.device.display(),
            error = %e,
            "cannot detach loop device"
        ),
        Err(e) => tracing::warn!(device = %dev.device.display(), error = %e, "cannot run losetup"),
    }
}

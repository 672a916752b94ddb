//! The target side of a migration: get ready to receive the VM, and adopt it when it arrives.

use crate::spec::VirtualMachineInstance;
use crate::vm::core::{ControlError, Launcher};
use crate::vm::ledger::Ledger;
use crate::vm::state::{MigrationMetadata, MigrationPhase, MigrationProgress, TargetInfo};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

impl Launcher {
    /// Readies this (VM-less) launcher to receive `vmi` by migration.
    ///
    /// `disk_sizes` (volume name to bytes) sizes the destination of a block migration: a local
    /// claim named there whose `disk.img` is missing is created sparse at the source's size.
    pub async fn prepare_migration_target(
        &self,
        vmi: VirtualMachineInstance,
        disk_sizes: HashMap<String, u64>,
    ) -> Result<TargetInfo, ControlError> {
        if self.has_started() || self.status().migration_target.is_some() {
            return Err(ControlError::Precondition(
                "this launcher already runs or awaits a VM".into(),
            ));
        }
        let sockets = self.sockets.clone().ok_or_else(|| {
            ControlError::Precondition("this launcher cannot receive migrations".into())
        })?;
        let created = crate::vm::plan::create_copy_targets(
            &vmi,
            &self.planner.paths.paths_for(&vmi),
            &disk_sizes,
        )?;
        let undo = |why: ControlError| {
            for (_, p) in &created {
                let _ = std::fs::remove_file(p);
            }
            why
        };
        let plan = self.planner.plan(&vmi).map_err(|e| undo(e.into()))?;
        // Block migration copies only writable disks: a read-only one must already be here.
        if let Some(d) = plan.domain.devices.disks.iter().find(|d| {
            (d.readonly || d.shareable || d.device == crate::domain::DiskDevice::Cdrom)
                && created.iter().any(|(v, _)| v == d.volume())
        }) {
            return Err(undo(ControlError::Precondition(format!(
                "volume {}: read-only or shareable disks are not copied by block migration; \
                 this pod must mount the same data",
                d.volume()
            ))));
        }
        self.planner
            .prepare(&vmi, &plan)
            .map_err(|e| undo(e.into()))?;
        // The arriving guest keeps its lease; the DHCP server answers its renewals and reboots.
        self.network_phase2(&vmi, &plan.domain).map_err(undo)?;
        let paths = &plan.facts.paths;
        let awaited = VmIdentity::of(&vmi, plan.domain.uuid.as_deref().unwrap_or_default());
        // The target's libvirtd asks the migration hook about every incoming domain (standalone
        // pods have one, see `pod::write_configs`): it reads what is awaited from here.
        let incoming = crate::pod::incoming_migration_file(&sockets.runtime_dir);
        awaited.save(&incoming).map_err(|e| {
            undo(ControlError::Internal(format!(
                "{}: {e}",
                incoming.display()
            )))
        })?;
        let info = TargetInfo {
            uid: awaited.uid.clone(),
            namespace: awaited.namespace.clone(),
            name: awaited.name.clone(),
            domain_uuid: awaited.domain_uuid.clone(),
            libvirt_uri: sockets.libvirt_uri.clone(),
            migration_uri: format!(
                "unix://{}",
                sockets.runtime_dir.join("migration.sock").display()
            ),
            disks_uri: format!(
                "unix://{}",
                sockets.runtime_dir.join("migration-disks.sock").display()
            ),
            private_dir: paths.private_dir.display().to_string(),
            ephemeral_dir: paths.ephemeral_disks_dir.display().to_string(),
            volumes_dir: paths.vmi_disks_dir.display().to_string(),
            hotplug_dir: paths.hotplug_disks_dir.display().to_string(),
        };
        self.set_console_log(paths.serial_log());
        let disks = plan
            .domain
            .devices
            .disks
            .iter()
            .map(|d| {
                crate::vm::volumes::disk_status(d, &vmi, crate::vm::state::Phase::Attaching, "")
            })
            .collect();
        let (name, target) = (plan.domain.name().to_string(), info.clone());
        let facts = crate::vm::state::DomainFacts::of(&plan.domain);
        self.update(move |s| {
            s.name = name;
            *s.domain = facts;
            s.uid = target.uid.clone();
            s.disks = disks;
            s.migration_target = Some(target);
            s.migration = Some(MigrationProgress::new(MigrationPhase::Prepared));
        });
        self.set_vmi(vmi);
        self.publish_migration(
            MigrationProgress::new(MigrationPhase::Prepared),
            "prepared as migration target",
        );
        tracing::info!(migration_uri = %info.migration_uri, libvirt_uri = %info.libvirt_uri, "ready to receive a migration");
        Ok(info)
    }

    /// KubeVirt's SyncMigrationTarget (`live-migration-target.go:160-283`): the migration
    /// socket directory (the incoming QEMU listens there, on the names the source's QEMU
    /// dials in its own pod), the target prepared as for any migration but defining nothing
    /// (the domain arrives through libvirt), and the KubeVirt metadata: the VMI's grace period
    /// and the migration's uid, start and mode. Again for the VMI awaited: nothing to do.
    pub(crate) async fn handler_prepare_target(
        &self,
        vmi: VirtualMachineInstance,
        migration_uid: String,
        proxy_dir: PathBuf,
    ) -> Result<(), ControlError> {
        let uid = vmi.metadata.uid.clone().unwrap_or_default();
        if self.awaiting_migration() && self.status().uid == uid {
            return Ok(());
        }
        crate::pod::create_migration_proxy_dir(&proxy_dir)
            .map_err(|e| ControlError::Precondition(e.to_string()))?;
        let grace = vmi.termination_grace_period().as_secs() as i64;
        self.prepare_migration_target(vmi, HashMap::new()).await?;
        let now = SystemTime::now();
        self.update(move |s| {
            s.kubevirt.deletion_grace_period_seconds = grace;
            s.kubevirt.migration = Some(MigrationMetadata {
                uid: migration_uid,
                start_timestamp: Some(now),
                mode: "PreCopy".into(),
                ..Default::default()
            });
        });
        tracing::info!(dir = %proxy_dir.display(), "ready to receive a migration through virt-handler's proxies");
        Ok(())
    }

    /// Whether this launcher is a prepared target whose VM has not arrived.
    pub fn awaiting_migration(&self) -> bool {
        !self.has_started() && self.status().migration_target.is_some()
    }

    /// The VM arrived (first lifecycle event on a prepared target): the owner adopts it.
    pub(crate) fn adopt_incoming(&self, ledger: &Ledger) {
        if !self.awaiting_migration() {
            return;
        }
        ledger.mark_started();
        if let Some(s) = &self.sockets {
            let _ = std::fs::remove_file(crate::pod::incoming_migration_file(&s.runtime_dir));
        }
        // It arrives when it resumes here: the incoming job is over. KubeVirt's target says so
        // in its metadata (`live-migration-target.go:352-420`).
        let now = SystemTime::now();
        ledger.update(move |s| {
            s.migration_target = None;
            for d in &mut s.disks {
                d.phase = crate::vm::state::Phase::Ready;
            }
            if let Some(m) = s.kubevirt.migration.as_mut() {
                m.end_timestamp.get_or_insert(now);
            }
        });
        let mut p = ledger
            .status()
            .migration
            .unwrap_or_else(|| MigrationProgress::new(MigrationPhase::Succeeded));
        p.phase = MigrationPhase::Succeeded;
        ledger.update(|s| s.migration = Some(p.clone()));
        ledger.publish_migration(p, "the VM arrived from the source");
        tracing::info!("incoming migration arrived; serving the VM");
    }
}

/// Which VM a migration target awaits, or a source holds: what must agree before a VM may go
/// there (KubeVirt's handlers match the migration by the VMI's uid; a hand-written VMI has
/// none, so the namespace, the name and the domain's UUID are compared too).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmIdentity {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid`; empty when the VMI has none.
    pub uid: String,
    /// The libvirt domain's name (`<namespace>_<name>`) and UUID.
    pub domain: String,
    pub domain_uuid: String,
}

impl VmIdentity {
    pub fn of(vmi: &VirtualMachineInstance, domain_uuid: &str) -> Self {
        VmIdentity {
            namespace: vmi.namespace().to_string(),
            name: vmi.metadata.name.clone(),
            uid: vmi.metadata.uid.clone().unwrap_or_default(),
            domain: vmi.domain_name(),
            domain_uuid: domain_uuid.to_string(),
        }
    }

    /// `default/migi (uid "…", domain UUID …)`, for messages that name both sides.
    pub fn describe(&self) -> String {
        let mut s = format!("{}/{}", self.namespace, self.name);
        let mut details = Vec::new();
        if !self.uid.is_empty() {
            details.push(format!("uid {}", self.uid));
        }
        if !self.domain_uuid.is_empty() {
            details.push(format!("domain UUID {}", self.domain_uuid));
        }
        if !details.is_empty() {
            s = format!("{s} ({})", details.join(", "));
        }
        s
    }

    /// Whether `target`, as its launcher reports it, was prepared for this VM: the same
    /// namespace and name (when it reports them; virt-handler's proxies do not), the same uid
    /// when either side has one, the same domain UUID when it reports one. Err: what the
    /// target was prepared for.
    pub fn accepted_by(&self, target: &TargetInfo) -> Result<(), String> {
        let names = target.name.is_empty()
            || (target.namespace == self.namespace && target.name == self.name);
        let uid = target.uid == self.uid;
        let uuid = target.domain_uuid.is_empty() || target.domain_uuid == self.domain_uuid;
        if names && uid && uuid {
            return Ok(());
        }
        let theirs = VmIdentity {
            namespace: target.namespace.clone(),
            name: target.name.clone(),
            uid: target.uid.clone(),
            domain: String::new(),
            domain_uuid: target.domain_uuid.clone(),
        };
        Err(if target.name.is_empty() {
            format!("VMI uid {:?}", target.uid)
        } else {
            theirs.describe()
        })
    }

    /// Whether an incoming domain (its live XML, as the source's libvirt sends it) is this
    /// one: the same domain name and UUID. Err: one line naming both.
    pub fn check_incoming(&self, xml: &str) -> Result<(), String> {
        let live = crate::domain::live::LiveDomain::parse(xml).map_err(|e| e.to_string())?;
        let name = live.name.unwrap_or_default();
        let uuid = live.uuid.unwrap_or_default().to_ascii_lowercase();
        if name == self.domain && uuid == self.domain_uuid.to_ascii_lowercase() {
            return Ok(());
        }
        Err(format!(
            "incoming migration of domain {name} (UUID {uuid}) refused: this launcher was \
             prepared for {} (domain {})",
            self.describe(),
            self.domain
        ))
    }

    /// Writes the identity for the migration hook (`path`).
    pub fn save(&self, path: &Path) -> Result<(), std::io::Error> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        std::fs::write(path, json)
    }

    /// Reads what [`VmIdentity::save`] wrote.
    pub fn load(path: &Path) -> Result<Self, std::io::Error> {
        let json = std::fs::read(path)?;
        serde_json::from_slice(&json).map_err(std::io::Error::other)
    }
}

/// The migration hook's verdict on an incoming domain (`xml`) for the launcher whose awaited
/// identity is at `awaited`: a launcher that was not prepared as a target accepts none.
pub fn judge_incoming(awaited: &Path, xml: &str) -> Result<(), String> {
    match VmIdentity::load(awaited) {
        Ok(id) => id.check_incoming(xml),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(
            "incoming migration refused: this launcher was not prepared as a migration target"
                .into(),
        ),
        Err(e) => Err(format!(
            "incoming migration refused: cannot read {}: {e}",
            awaited.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str, uid: &str, uuid: &str) -> VmIdentity {
        VmIdentity {
            namespace: "default".into(),
            name: name.into(),
            uid: uid.into(),
            domain: format!("default_{name}"),
            domain_uuid: uuid.into(),
        }
    }

    fn target(i: &VmIdentity) -> TargetInfo {
        TargetInfo {
            uid: i.uid.clone(),
            namespace: i.namespace.clone(),
            name: i.name.clone(),
            domain_uuid: i.domain_uuid.clone(),
            ..Default::default()
        }
    }

    const U1: &str = "11111111-1111-4111-8111-111111111111";
    const U2: &str = "22222222-2222-4222-8222-222222222222";

    #[test]
    fn a_target_accepts_only_the_vm_it_was_prepared_for() {
        let migi = id("migi", "", U1);
        assert_eq!(migi.accepted_by(&target(&migi)), Ok(()));
        // Neither has a uid (hand-written VMIs): the names and UUIDs decide.
        let e = migi.accepted_by(&target(&id("other", "", U2))).unwrap_err();
        assert!(e.contains("default/other") && e.contains(U2), "{e}");
        // Same name, another domain UUID (spec.domain.firmware.uuid changed).
        assert!(migi.accepted_by(&target(&id("migi", "", U2))).is_err());
        // A uid on one side only.
        assert!(migi.accepted_by(&target(&id("migi", "u", U1))).is_err());
        assert!(id("migi", "u", U1)
            .accepted_by(&target(&id("migi", "", U1)))
            .is_err());
        // virt-handler's proxies tell only the uid.
        let proxies = TargetInfo {
            uid: "u".into(),
            ..Default::default()
        };
        assert_eq!(id("migi", "u", U1).accepted_by(&proxies), Ok(()));
        let e = id("migi", "v", U1).accepted_by(&proxies).unwrap_err();
        assert!(e.contains("\"u\""), "{e}");
    }

    #[test]
    fn the_hook_refuses_another_domain_naming_both() {
        let awaited = id("other", "", U2);
        let xml = |name: &str, uuid: &str| {
            format!("<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid></domain>")
        };
        assert_eq!(awaited.check_incoming(&xml("default_other", U2)), Ok(()));
        let e = awaited
            .check_incoming(&xml("default_migi", U1))
            .unwrap_err();
        assert!(
            e.contains("default_migi") && e.contains(U1) && e.contains("default/other"),
            "{e}"
        );
        assert!(awaited.check_incoming(&xml("default_other", U1)).is_err());
        assert!(awaited.check_incoming("not xml <").is_err());

        let dir = std::env::temp_dir().join(format!("vl-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("incoming-migration");
        let e = judge_incoming(&path, &xml("default_other", U2)).unwrap_err();
        assert!(e.contains("not prepared"), "{e}");
        awaited.save(&path).unwrap();
        assert_eq!(judge_incoming(&path, &xml("default_other", U2)), Ok(()));
        assert!(judge_incoming(&path, &xml("default_migi", U1)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

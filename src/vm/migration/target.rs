//! The target side of a migration: get ready to receive the VM, and adopt it when it arrives.

use crate::spec::VirtualMachineInstance;
use crate::vm::core::{ControlError, Launcher};
use crate::vm::ledger::Ledger;
use crate::vm::state::{MigrationMetadata, MigrationPhase, MigrationProgress, TargetInfo};
use std::collections::HashMap;
use std::path::PathBuf;
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
        let info = TargetInfo {
            uid: vmi.metadata.uid.clone().unwrap_or_default(),
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

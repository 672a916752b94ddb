//! What the launcher knows about its domain, kept current from libvirt events, and the
//! numbered event log that controllers follow. Plain data: no libvirt, no I/O.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::broadcast;

/// The domain's state as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub enum State {
    /// No domain yet (waiting for a VMI).
    #[default]
    None,
    Starting,
    Running,
    Paused,
    ShuttingDown,
    Shutoff,
    Crashed,
}

/// A volume's phase, as KubeVirt users know them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Phase {
    Attaching,
    Ready,
    Detaching,
    Detached,
    Failed,
}

/// One disk of the domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskStatus {
    pub volume: String,
    pub target: String,
    pub bus: String,
    pub source: String,
    pub phase: Phase,
    pub message: String,
    pub hotplugged: bool,
    pub shared: bool,
    /// Read-only or a cdrom: never needs copying in a migration.
    pub readonly: bool,
    pub size_bytes: u64,
    /// libvirt's device kind: "disk", "cdrom" or "lun".
    pub device: String,
    /// The source is a block device (else a file).
    pub block: bool,
}

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MigrationPhase {
    Prepared,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MigrationMode {
    PreCopy,
    PostCopy,
}

/// A migration's progress (or outcome).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationProgress {
    pub phase: MigrationPhase,
    pub mode: MigrationMode,
    pub data_total: u64,
    pub data_processed: u64,
    pub data_remaining: u64,
    pub iteration: u64,
    pub dirty_rate: u64,
    pub downtime_ms: u64,
    pub elapsed_ms: u64,
}

impl MigrationProgress {
    pub fn new(phase: MigrationPhase) -> Self {
        MigrationProgress {
            phase,
            mode: MigrationMode::PreCopy,
            data_total: 0,
            data_processed: 0,
            data_remaining: 0,
            iteration: 0,
            dirty_rate: 0,
            downtime_ms: 0,
            elapsed_ms: 0,
        }
    }
}

/// Where a prepared migration target listens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TargetInfo {
    pub uid: String,
    /// The VM it was prepared for: the VMI's namespace and name, and the domain's UUID (empty
    /// when the peer cannot tell, as virt-handler's proxies).
    pub namespace: String,
    pub name: String,
    pub domain_uuid: String,
    pub libvirt_uri: String,
    pub migration_uri: String,
    pub disks_uri: String,
    pub private_dir: String,
    pub ephemeral_dir: String,
    pub volumes_dir: String,
    pub hotplug_dir: String,
}

/// The snapshot GetDomain returns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Status {
    pub name: String,
    pub uid: String,
    pub state: State,
    pub reason: String,
    pub disks: Vec<DiskStatus>,
    pub last_seq: u64,
    pub migration_target: Option<TargetInfo>,
    pub migration: Option<MigrationProgress>,
    /// What KubeVirt's virt-handler reads from the domain's metadata (boxed: rarely set,
    /// and `Status` travels in replies).
    pub kubevirt: Box<KubevirtMetadata>,
    /// The domain's definition was removed (KubeVirt's Delete): the launcher is ending.
    pub deleted: bool,
    /// What the core knows of the domain's definition and its guest (boxed: the status
    /// travels in replies).
    pub domain: Box<DomainFacts>,
}

/// The domain's definition as the core made it (and libvirt completed it), and what the
/// guest agent reported: what a front-end needs to describe the domain (KubeVirt's domain
/// JSON) without asking libvirt.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DomainFacts {
    /// "kvm" or "qemu".
    pub domain_type: String,
    pub uuid: String,
    pub arch: String,
    pub machine: String,
    pub memory_kib: u64,
    pub acpi: bool,
    pub interfaces: Vec<InterfaceFacts>,
    /// The virtio-serial channels' target names (`org.qemu.guest_agent.0`).
    pub channels: Vec<String>,
    pub agent_connected: bool,
    /// The guest's filesystems are frozen.
    pub frozen: bool,
    /// What the guest agent last answered to each command polled (`guest-get-osinfo`,
    /// `guest-get-users`, ...): its `return` value, as the agent gave it. Kept after the agent
    /// disconnects (it describes the guest as last seen), empty until it first answers.
    pub guest: std::collections::BTreeMap<String, serde_json::Value>,
}

/// One network interface of the domain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InterfaceFacts {
    /// The VMI's interface name (the alias without `ua-`).
    pub name: String,
    /// The MAC address (the VMI's, else the one libvirt chose; empty until known).
    pub mac: String,
    /// libvirt's interface type: "ethernet" (a tap) or "vhostuser" (passt).
    pub kind: String,
    /// The tap device (empty for passt).
    pub tap: String,
    pub model: String,
    /// The guest's addresses: the lease our DHCP server gave (empty until given).
    pub ips: Vec<String>,
}

impl DomainFacts {
    /// The guest's addresses on the interface with MAC `mac`: what the guest agent last
    /// reported (`guest-network-get-interfaces`) when it did, else the lease our DHCP server
    /// gave (issue #18: the agent's view first).
    pub fn interface_ips(&self, iface: &InterfaceFacts) -> Vec<String> {
        let from_agent = self
            .guest
            .get("guest-network-get-interfaces")
            .and_then(serde_json::Value::as_array)
            .and_then(|list| {
                list.iter().find(|i| {
                    !iface.mac.is_empty()
                        && i.get("hardware-address")
                            .and_then(serde_json::Value::as_str)
                            .is_some_and(|m| m.eq_ignore_ascii_case(&iface.mac))
                })
            })
            .and_then(|i| i.get("ip-addresses"))
            .and_then(serde_json::Value::as_array)
            .map(|addrs| {
                addrs
                    .iter()
                    .filter_map(|a| a.get("ip-address").and_then(serde_json::Value::as_str))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .filter(|ips| !ips.is_empty());
        from_agent.unwrap_or_else(|| iface.ips.clone())
    }

    /// The facts of a planned domain (MACs libvirt has yet to choose are empty).
    pub fn of(d: &crate::domain::Domain) -> DomainFacts {
        DomainFacts {
            domain_type: d.domain_type.as_str().to_string(),
            uuid: d.uuid.clone().unwrap_or_default(),
            arch: d.os.arch.clone(),
            machine: d.os.machine.clone(),
            memory_kib: d.memory.kib,
            acpi: d.features.acpi,
            interfaces: d
                .devices
                .interfaces
                .iter()
                .map(|i| InterfaceFacts {
                    name: i.alias.strip_prefix("ua-").unwrap_or(&i.alias).to_string(),
                    mac: i.mac.clone().unwrap_or_default(),
                    kind: i.attachment.kind().to_string(),
                    tap: match &i.attachment {
                        crate::domain::Attachment::Tap(t) => t.clone(),
                        _ => String::new(),
                    },
                    model: i.model.clone(),
                    ips: Vec::new(),
                })
                .collect(),
            channels: d
                .devices
                .channels
                .iter()
                .map(|c| c.target_name.clone())
                .collect(),
            agent_connected: false,
            frozen: false,
            guest: Default::default(),
        }
    }

    /// Fills the MACs libvirt chose, from the live domain.
    pub fn learn_macs(&mut self, live: &crate::domain::live::LiveDomain) {
        let Some(devices) = &live.devices else {
            return;
        };
        for l in &devices.interface {
            let alias = l.alias.as_ref().and_then(|a| a.name.as_deref());
            let mac = l.mac.as_ref().and_then(|m| m.address.as_deref());
            let (Some(alias), Some(mac)) = (alias, mac) else {
                continue;
            };
            let name = alias.strip_prefix("ua-").unwrap_or(alias);
            if let Some(i) = self.interfaces.iter_mut().find(|i| i.name == name) {
                if i.mac.is_empty() {
                    i.mac = mac.to_string();
                }
            }
        }
    }
}

/// The domain metadata KubeVirt's virt-handler reads (`Spec.Metadata.KubeVirt` of its domain
/// JSON): the graceful-shutdown stamps and the migration's progress. Kept by the core; the
/// KubeVirt front-end renders it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KubevirtMetadata {
    /// `GracePeriod.DeletionGracePeriodSeconds`: the VMI's termination grace period.
    pub deletion_grace_period_seconds: i64,
    /// `GracePeriod.DeletionTimestamp`: when the first Shutdown was asked for.
    pub deletion_timestamp: Option<SystemTime>,
    /// `GracePeriod.MarkedForGracefulShutdown`: the pod got SIGTERM.
    pub marked_for_graceful_shutdown: bool,
    /// `Migration`: the migration under way or last ended.
    pub migration: Option<MigrationMetadata>,
}

/// `Spec.Metadata.KubeVirt.Migration` of KubeVirt's domain JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MigrationMetadata {
    /// `vmi.status.migrationState.migrationUid`.
    pub uid: String,
    pub start_timestamp: Option<SystemTime>,
    pub end_timestamp: Option<SystemTime>,
    pub failed: bool,
    pub failure_reason: String,
    /// "", "Aborting", "Succeeded" or "Failed".
    pub abort_status: String,
    /// "PreCopy", "PostCopy" or "Paused".
    pub mode: String,
}

impl Status {
    pub fn disk_mut(&mut self, volume: &str) -> Option<&mut DiskStatus> {
        self.disks.iter_mut().find(|d| d.volume == volume)
    }
}

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum EventKind {
    Domain,
    Volume,
    Daemon,
    IoError,
    Final,
    Agent,
    Migration,
}

/// One numbered event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    pub seq: u64,
    pub time_unix_ms: i64,
    pub kind: EventKind,
    pub state: State,
    pub reason: String,
    pub volume: String,
    pub phase: Option<Phase>,
    pub message: String,
    pub migration: Option<MigrationProgress>,
}

impl Event {
    pub fn new(kind: EventKind) -> Event {
        Event {
            seq: 0,
            time_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
            kind,
            state: State::None,
            reason: String::new(),
            volume: String::new(),
            phase: None,
            message: String::new(),
            migration: None,
        }
    }
}

/// Why a resume point cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("events after {after} are no longer kept (oldest kept: {oldest}); call GetDomain and watch from its last_seq")]
pub struct Gap {
    pub after: u64,
    pub oldest: u64,
}

/// A bounded, numbered log of events with live subscription. Sequence numbers start at 1 and
/// have no holes, so a subscriber that knows its last number can tell whether it missed any.
pub struct EventLog {
    inner: Mutex<LogInner>,
    live: broadcast::Sender<Event>,
    capacity: usize,
}

struct LogInner {
    next: u64,
    kept: VecDeque<Event>,
}

impl EventLog {
    pub fn new(capacity: usize) -> EventLog {
        let (live, _) = broadcast::channel(capacity.max(16));
        EventLog {
            inner: Mutex::new(LogInner {
                next: 1,
                kept: VecDeque::new(),
            }),
            live,
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Numbers, keeps and broadcasts `event`; returns its sequence number.
    pub fn push(&self, mut event: Event) -> u64 {
        let mut inner = self.lock();
        event.seq = inner.next;
        inner.next += 1;
        if inner.kept.len() == self.capacity {
            inner.kept.pop_front();
        }
        inner.kept.push_back(event.clone());
        // Sent under the lock so live order equals sequence order.
        let _ = self.live.send(event.clone());
        event.seq
    }

    /// Waits until every live subscriber has taken every event, for at most `within`; at once
    /// when nobody subscribes. False when a subscriber is still behind at the deadline.
    pub async fn delivered(&self, within: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.live.receiver_count() > 0 && !self.live.is_empty() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        true
    }

    /// The sequence number of the newest event (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.lock().next - 1
    }

    /// Kept events after `after`, plus a live receiver that continues exactly where they end.
    pub fn subscribe(&self, after: u64) -> Result<(Vec<Event>, broadcast::Receiver<Event>), Gap> {
        let inner = self.lock();
        let rx = self.live.subscribe();
        let oldest = inner.kept.front().map(|e| e.seq).unwrap_or(inner.next);
        if after + 1 < oldest && after < inner.next - 1 {
            return Err(Gap { after, oldest });
        }
        let backlog = inner
            .kept
            .iter()
            .filter(|e| e.seq > after)
            .cloned()
            .collect();
        Ok((backlog, rx))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn interface_addresses_come_from_the_agent_else_the_lease() {
        let mut d = super::DomainFacts::default();
        let ifc = super::InterfaceFacts {
            name: "default".into(),
            mac: "02:00:00:aa:bb:01".into(),
            ips: vec!["10.0.2.2".into()],
            ..Default::default()
        };
        assert_eq!(d.interface_ips(&ifc), vec!["10.0.2.2"]);
        d.guest.insert(
            "guest-network-get-interfaces".into(),
            serde_json::json!([
                {"name": "lo", "hardware-address": "00:00:00:00:00:00",
                 "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1"}]},
                {"name": "eth0", "hardware-address": "02:00:00:AA:BB:01", "ip-addresses": [
                    {"ip-address-type": "ipv4", "ip-address": "10.0.2.2", "prefix": 24},
                    {"ip-address-type": "ipv6", "ip-address": "fd10:0:2::2", "prefix": 120}]}
            ]),
        );
        assert_eq!(d.interface_ips(&ifc), vec!["10.0.2.2", "fd10:0:2::2"]);
        // An interface the agent does not list (no addresses yet): the lease.
        let other = super::InterfaceFacts {
            mac: "02:00:00:aa:bb:09".into(),
            ..ifc.clone()
        };
        assert_eq!(d.interface_ips(&other), vec!["10.0.2.2"]);
    }

    use super::*;

    fn ev(msg: &str) -> Event {
        let mut e = Event::new(EventKind::Daemon);
        e.message = msg.into();
        e
    }

    #[test]
    fn sequence_numbers_have_no_holes_and_resume_is_exact() {
        let log = EventLog::new(4);
        assert_eq!(log.last_seq(), 0);
        for i in 1..=3 {
            assert_eq!(log.push(ev(&i.to_string())), i);
        }
        let (backlog, mut rx) = log.subscribe(1).unwrap();
        assert_eq!(
            backlog.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![2, 3]
        );
        log.push(ev("4"));
        assert_eq!(rx.try_recv().unwrap().seq, 4);
    }

    #[test]
    fn the_macs_libvirt_chose_fill_only_the_interfaces_without_one() {
        let iface = |name: &str, mac: &str| InterfaceFacts {
            name: name.into(),
            mac: mac.into(),
            kind: "ethernet".into(),
            tap: String::new(),
            model: "virtio".into(),
            ips: vec![],
        };
        let mut facts = DomainFacts {
            interfaces: vec![iface("default", ""), iface("given", "02:00:00:00:00:01")],
            ..Default::default()
        };
        let live = crate::domain::live::LiveDomain::parse(
            "<domain type='kvm'><name>d</name><devices>\
             <interface type='ethernet'><mac address='52:54:00:aa:bb:cc'/><alias name='ua-default'/></interface>\
             <interface type='ethernet'><mac address='52:54:00:00:00:02'/><alias name='ua-given'/></interface>\
             <interface type='ethernet'><mac address='52:54:00:00:00:03'/><alias name='net9'/></interface>\
             </devices></domain>",
        )
        .unwrap();
        facts.learn_macs(&live);
        assert_eq!(facts.interfaces[0].mac, "52:54:00:aa:bb:cc");
        assert_eq!(
            facts.interfaces[1].mac, "02:00:00:00:00:01",
            "the VMI's MAC stays"
        );
        assert_eq!(facts.interfaces.len(), 2);
    }

    #[test]
    fn a_resume_point_older_than_the_log_is_a_gap() {
        let log = EventLog::new(2);
        for i in 1..=5 {
            log.push(ev(&i.to_string()));
        }
        // Kept: 4, 5. After 3 is fine (nothing missed); after 2 missed event 3.
        assert!(log.subscribe(3).is_ok());
        assert_eq!(
            log.subscribe(2).unwrap_err(),
            Gap {
                after: 2,
                oldest: 4
            }
        );
        // "From now on" (the newest seq) is always fine.
        assert!(log.subscribe(5).unwrap().0.is_empty());
    }
}

//! Hand-written XML serialiser for [`Domain`]: indentation, escaping, nothing else.

use super::*;
use std::fmt::Write as _;
use std::path::Path;

/// Escape for attribute values and text. Characters that XML 1.0 cannot represent at all
/// (C0 controls other than tab/LF/CR, U+FFFE/U+FFFF) become U+FFFD.
pub(crate) fn escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => {
                let _ = write!(out, "&#{};", c as u32);
            }
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
}

type Attrs<'a> = Vec<(&'static str, std::borrow::Cow<'a, str>)>;

struct W {
    out: String,
    depth: usize,
}

fn p(path: &Path) -> std::borrow::Cow<'_, str> {
    path.to_string_lossy()
}

fn yn(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

impl W {
    fn indent(&mut self) {
        for _ in 0..self.depth {
            self.out.push_str("  ");
        }
    }
    fn start(&mut self, name: &str, attrs: &Attrs<'_>) {
        self.indent();
        self.out.push('<');
        self.out.push_str(name);
        for (k, v) in attrs {
            self.out.push(' ');
            self.out.push_str(k);
            self.out.push_str("='");
            escape(v, &mut self.out);
            self.out.push('\'');
        }
    }
    fn open(&mut self, name: &str, attrs: Attrs<'_>) {
        self.start(name, &attrs);
        self.out.push_str(">\n");
        self.depth += 1;
    }
    fn empty(&mut self, name: &str, attrs: Attrs<'_>) {
        self.start(name, &attrs);
        self.out.push_str("/>\n");
    }
    fn leaf(&mut self, name: &str, attrs: Attrs<'_>, text: &str) {
        self.start(name, &attrs);
        self.out.push('>');
        escape(text, &mut self.out);
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push_str(">\n");
    }
    fn close(&mut self, name: &str) {
        self.depth = self.depth.saturating_sub(1);
        self.indent();
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push_str(">\n");
    }
    fn comment(&mut self, text: &str) {
        self.indent();
        self.out.push_str("<!-- ");
        let mut esc = String::new();
        escape(text, &mut esc);
        // "--" may not appear inside a comment.
        self.out.push_str(&esc.replace("--", "- -"));
        self.out.push_str(" -->\n");
    }
}

macro_rules! attrs {
    () => { Vec::new() };
    ($($k:literal => $v:expr),+ $(,)?) => {
        vec![$(($k, std::borrow::Cow::from($v))),+]
    };
}

/// One `<disk>` element on its own, as `virDomainAttachDeviceFlags` takes it.
pub(crate) fn write_single_disk(d: &Disk) -> String {
    let mut w = W {
        out: String::new(),
        depth: 0,
    };
    write_disk(&mut w, d);
    w.out
}

pub(crate) fn write_domain(d: &Domain) -> String {
    let mut w = W {
        out: String::with_capacity(4096 + 600 * d.devices.disks.len()),
        depth: 0,
    };
    w.open("domain", attrs!["type" => d.domain_type.as_str()]);
    w.leaf("name", attrs![], &d.name);
    if let Some(uuid) = &d.uuid {
        w.leaf("uuid", attrs![], uuid);
    }
    if let Some(uid) = &d.kubevirt_uid {
        w.open("metadata", attrs![]);
        w.open("kubevirt", attrs!["xmlns" => "http://kubevirt.io"]);
        w.leaf("uid", attrs![], uid);
        w.close("kubevirt");
        w.close("metadata");
    }
    if let Some(max) = d.memory.max_kib {
        w.leaf(
            "maxMemory",
            attrs!["slots" => "0", "unit" => "KiB"],
            &max.to_string(),
        );
    }
    let kib = d.memory.kib.to_string();
    w.leaf("memory", attrs!["unit" => "KiB"], &kib);
    w.leaf("currentMemory", attrs!["unit" => "KiB"], &kib);
    if d.memory.hugepage_kib.is_some() || d.memory.memfd || d.memory.shared {
        w.open("memoryBacking", attrs![]);
        if let Some(size) = d.memory.hugepage_kib {
            w.open("hugepages", attrs![]);
            w.empty("page", attrs!["size" => size.to_string(), "unit" => "KiB"]);
            w.close("hugepages");
        }
        if d.memory.memfd {
            w.empty("source", attrs!["type" => "memfd"]);
        }
        if d.memory.shared {
            w.empty("access", attrs!["mode" => "shared"]);
        }
        w.close("memoryBacking");
    }
    w.leaf(
        "vcpu",
        attrs!["placement" => "static"],
        &d.vcpus.to_string(),
    );
    if let Some(h) = d.vcpu_hotplug {
        w.open("vcpus", attrs![]);
        for id in 0..d.vcpus {
            w.empty(
                "vcpu",
                attrs![
                    "id" => id.to_string(),
                    "enabled" => if id < h.enabled { "yes" } else { "no" },
                    "hotpluggable" => if id >= h.fixed { "yes" } else { "no" },
                ],
            );
        }
        w.close("vcpus");
    }
    if d.iothreads > 0 {
        w.leaf("iothreads", attrs![], &d.iothreads.to_string());
    }
    if let Some(t) = &d.cputune {
        w.open("cputune", attrs![]);
        for (vcpu, set) in &t.vcpupin {
            w.empty(
                "vcpupin",
                attrs!["vcpu" => vcpu.to_string(), "cpuset" => set.as_str()],
            );
        }
        if let Some(set) = &t.emulatorpin {
            w.empty("emulatorpin", attrs!["cpuset" => set.as_str()]);
        }
        for (thread, set) in &t.iothreadpin {
            w.empty(
                "iothreadpin",
                attrs!["iothread" => thread.to_string(), "cpuset" => set.as_str()],
            );
        }
        w.close("cputune");
    }
    write_sysinfo(&mut w, d);
    write_os(&mut w, &d.os);
    write_features(&mut w, &d.features);
    write_cpu(&mut w, &d.cpu, d.memory.memfd.then_some(d.memory.kib));
    write_clock(&mut w, &d.clock);
    w.leaf("on_poweroff", attrs![], d.on_poweroff);
    w.leaf("on_reboot", attrs![], d.on_reboot);
    w.leaf("on_crash", attrs![], d.on_crash);
    write_devices(&mut w, &d.devices);
    w.close("domain");
    w.out
}

fn write_sysinfo(w: &mut W, d: &Domain) {
    let Some(si) = &d.sysinfo else { return };
    w.open("sysinfo", attrs!["type" => "smbios"]);
    w.open("system", attrs![]);
    for (k, v) in &si.system {
        w.leaf("entry", attrs!["name" => k.as_str()], v);
    }
    w.close("system");
    if !si.chassis.is_empty() {
        w.open("chassis", attrs![]);
        for (k, v) in &si.chassis {
            w.leaf("entry", attrs!["name" => k.as_str()], v);
        }
        w.close("chassis");
    }
    w.close("sysinfo");
}

fn write_os(w: &mut W, os: &Os) {
    w.open("os", attrs![]);
    w.leaf(
        "type",
        attrs!["arch" => os.arch.as_str(), "machine" => os.machine.as_str()],
        "hvm",
    );
    if let Some(l) = &os.loader {
        w.leaf(
            "loader",
            attrs!["readonly" => "yes", "secure" => yn(l.secure), "type" => "pflash"],
            &p(&l.path),
        );
    }
    if let Some(n) = &os.nvram {
        w.leaf("nvram", attrs!["template" => p(&n.template)], &p(&n.path));
    }
    if let Some(k) = &os.kernel {
        w.leaf("kernel", attrs![], &p(k));
    }
    if let Some(i) = &os.initrd {
        w.leaf("initrd", attrs![], &p(i));
    }
    if let Some(c) = &os.cmdline {
        w.leaf("cmdline", attrs![], c);
    }
    if os.bios_use_serial {
        w.empty("bios", attrs!["useserial" => "yes"]);
    }
    if os.smbios_sysinfo {
        w.empty("smbios", attrs!["mode" => "sysinfo"]);
    }
    w.close("os");
}

fn write_features(w: &mut W, f: &Features) {
    if !f.acpi
        && f.apic.is_none()
        && !f.smm
        && f.hyperv.is_empty()
        && f.kvm_hidden.is_none()
        && !f.kvm_hint_dedicated
        && f.pvspinlock.is_none()
        && !f.vmport_off
    {
        return;
    }
    w.open("features", attrs![]);
    if f.acpi {
        w.empty("acpi", attrs![]);
    }
    if let Some(eoi) = f.apic {
        match eoi {
            Some(e) => w.empty("apic", attrs!["eoi" => on_off(e)]),
            None => w.empty("apic", attrs![]),
        }
    }
    if !f.hyperv.is_empty() {
        w.open("hyperv", attrs!["mode" => "custom"]);
        for h in &f.hyperv {
            let mut a: Attrs<'_> = attrs!["state" => on_off(h.on)];
            for (k, v) in &h.attrs {
                a.push((k, v.as_str().into()));
            }
            match h.direct {
                Some(direct) => {
                    w.open(h.name, a);
                    w.empty("direct", attrs!["state" => on_off(direct)]);
                    w.close(h.name);
                }
                None => w.empty(h.name, a),
            }
        }
        w.close("hyperv");
    }
    if f.kvm_hidden.is_some() || f.kvm_hint_dedicated {
        w.open("kvm", attrs![]);
        if let Some(h) = f.kvm_hidden {
            w.empty("hidden", attrs!["state" => on_off(h)]);
        }
        if f.kvm_hint_dedicated {
            w.empty("hint-dedicated", attrs!["state" => "on"]);
        }
        w.close("kvm");
    }
    if let Some(p) = f.pvspinlock {
        w.empty("pvspinlock", attrs!["state" => on_off(p)]);
    }
    if f.vmport_off {
        w.empty("vmport", attrs!["state" => "off"]);
    }
    if f.smm {
        w.empty("smm", attrs!["state" => "on"]);
    }
    w.close("features");
}

/// `numa_kib`: one NUMA cell with every vCPU and this much memory.
fn write_cpu(w: &mut W, cpu: &Cpu, numa_kib: Option<u64>) {
    let a: Attrs<'_> = match &cpu.mode {
        CpuMode::HostModel => attrs!["mode" => "host-model", "check" => "partial"],
        CpuMode::HostPassthrough => attrs!["mode" => "host-passthrough", "check" => "none"],
        CpuMode::Custom(_) => attrs!["mode" => "custom", "match" => "exact", "check" => "none"],
    };
    w.open("cpu", a);
    if let Some(c) = &cpu.comment {
        w.comment(c);
    }
    if let CpuMode::Custom(m) = &cpu.mode {
        w.leaf("model", attrs!["fallback" => "allow"], m);
    }
    w.empty(
        "topology",
        attrs![
            "sockets" => cpu.sockets.to_string(),
            "dies" => "1",
            "cores" => cpu.cores.to_string(),
            "threads" => cpu.threads.to_string(),
        ],
    );
    for (policy, name) in &cpu.features {
        w.empty(
            "feature",
            attrs!["policy" => policy.as_str(), "name" => name.as_str()],
        );
    }
    if let Some(kib) = numa_kib {
        let vcpus = cpu.sockets * cpu.cores * cpu.threads;
        w.open("numa", attrs![]);
        w.empty(
            "cell",
            attrs![
                "id" => "0",
                "cpus" => format!("0-{}", vcpus.saturating_sub(1)),
                "memory" => kib.to_string(),
                "unit" => "KiB",
            ],
        );
        w.close("numa");
    }
    w.close("cpu");
}

fn write_clock(w: &mut W, c: &Clock) {
    let a: Attrs<'_> = match &c.offset {
        ClockOffset::Utc { adjustment: None } => attrs!["offset" => "utc"],
        ClockOffset::Utc {
            adjustment: Some(adj),
        } => attrs!["offset" => "utc", "adjustment" => adj.to_string()],
        ClockOffset::Timezone(tz) => attrs!["offset" => "timezone", "timezone" => tz.as_str()],
    };
    if c.timers.is_empty() {
        w.empty("clock", a);
        return;
    }
    w.open("clock", a);
    for t in &c.timers {
        let mut a: Attrs<'_> = attrs!["name" => t.name];
        if let Some(pr) = t.present {
            a.push(("present", yn(pr).into()));
        }
        if let Some(tp) = &t.tickpolicy {
            a.push(("tickpolicy", tp.as_str().into()));
        }
        if let Some(tr) = &t.track {
            a.push(("track", tr.as_str().into()));
        }
        w.empty("timer", a);
    }
    w.close("clock");
}

fn source_attrs(s: &DiskSource) -> (&'static str, Attrs<'_>) {
    match s {
        DiskSource::File(f) => ("file", attrs!["file" => p(f)]),
        DiskSource::Block(d) => ("block", attrs!["dev" => p(d)]),
    }
}

fn write_disk(w: &mut W, d: &Disk) {
    let (kind, src) = source_attrs(&d.source);
    let mut a: Attrs<'_> = attrs!["type" => kind, "device" => d.device.as_str()];
    if let Some(m) = &d.model {
        a.push(("model", m.as_str().into()));
    }
    w.open("disk", a);
    let dr = &d.driver;
    let mut a: Attrs<'_> = attrs!["name" => "qemu", "type" => dr.format];
    if let Some(c) = &dr.cache {
        a.push(("cache", c.as_str().into()));
    }
    if let Some(e) = &dr.error_policy {
        a.push(("error_policy", e.as_str().into()));
    }
    if let Some(io) = &dr.io {
        a.push(("io", io.as_str().into()));
    }
    if let Some(disc) = dr.discard {
        a.push(("discard", disc.into()));
    }
    if let Some(t) = dr.iothread {
        a.push(("iothread", t.to_string().into()));
    }
    if let Some(q) = dr.queues {
        a.push(("queues", q.to_string().into()));
    }
    if dr.iothread_pool.is_empty() {
        w.empty("driver", a);
    } else {
        w.open("driver", a);
        w.open("iothreads", attrs![]);
        for id in &dr.iothread_pool {
            w.empty("iothread", attrs!["id" => id.to_string()]);
        }
        w.close("iothreads");
        w.close("driver");
    }
    if d.reservations.is_none() && d.data_store.is_none() {
        w.empty("source", src);
    } else {
        w.open("source", src);
        if let Some(sock) = &d.reservations {
            w.open("reservations", attrs!["managed" => "no"]);
            w.empty(
                "source",
                attrs!["type" => "unix", "path" => p(sock), "mode" => "client"],
            );
            w.close("reservations");
        }
        if let Some(ds) = &d.data_store {
            let (kind, src) = source_attrs(&ds.source);
            w.open("dataStore", attrs!["type" => kind]);
            w.empty("format", attrs!["type" => ds.format]);
            w.empty("source", src);
            w.close("dataStore");
        }
        w.close("source");
    }
    if let Some(bs) = &d.backing_store {
        let (kind, src) = source_attrs(&bs.source);
        w.open("backingStore", attrs!["type" => kind]);
        w.empty("format", attrs!["type" => bs.format]);
        w.empty("source", src);
        w.close("backingStore");
    }
    let mut a: Attrs<'_> = attrs!["dev" => d.target_dev.as_str(), "bus" => d.bus.as_str()];
    if let Some(t) = &d.tray {
        a.push(("tray", t.as_str().into()));
    }
    w.empty("target", a);
    if let Some(b) = d.blockio {
        let mut a: Attrs<'_> = attrs![
            "logical_block_size" => b.logical.to_string(),
            "physical_block_size" => b.physical.to_string(),
        ];
        if let Some(g) = b.discard_granularity {
            a.push(("discard_granularity", g.to_string().into()));
        }
        w.empty("blockio", a);
    }
    if d.readonly {
        w.empty("readonly", attrs![]);
    }
    if d.shareable {
        w.empty("shareable", attrs![]);
    }
    if let Some(s) = &d.serial {
        w.leaf("serial", attrs![], s);
    }
    if let Some(b) = d.boot_order {
        w.empty("boot", attrs!["order" => b.to_string()]);
    }
    w.empty("alias", attrs!["name" => d.alias.as_str()]);
    match d.address {
        Some(DiskAddress::Drive(a)) => w.empty(
            "address",
            attrs![
                "type" => "drive",
                "controller" => a.controller.to_string(),
                "bus" => a.bus.to_string(),
                "unit" => a.unit.to_string(),
            ],
        ),
        Some(DiskAddress::Pci {
            domain,
            bus,
            slot,
            function,
        }) => w.empty(
            "address",
            attrs![
                "type" => "pci",
                "domain" => format!("{domain:#06x}"),
                "bus" => format!("{bus:#04x}"),
                "slot" => format!("{slot:#04x}"),
                "function" => format!("{function:#x}"),
            ],
        ),
        None => {}
    }
    w.close("disk");
}

/// A device's slot on the root complex (`pcie.0`), as KubeVirt's PlacePCIDevicesOnRootComplex
/// writes it.
fn write_pci_slot(w: &mut W, slot: Option<u8>) {
    if let Some(slot) = slot {
        w.empty(
            "address",
            attrs![
                "type" => "pci",
                "domain" => "0x0000",
                "bus" => "0x00",
                "slot" => format!("{slot:#04x}"),
                "function" => "0x0",
            ],
        );
    }
}

fn write_devices(w: &mut W, dv: &Devices) {
    w.open("devices", attrs![]);
    for d in &dv.disks {
        write_disk(w, d);
    }
    for c in &dv.controllers {
        let mut a: Attrs<'_> = attrs!["type" => c.kind];
        if let Some(i) = c.index {
            a.push(("index", i.to_string().into()));
        }
        if let Some(m) = &c.model {
            a.push(("model", m.as_str().into()));
        }
        if c.driver.is_none() && c.pci_slot.is_none() {
            w.empty("controller", a);
            continue;
        }
        w.open("controller", a);
        if let Some(d) = c.driver {
            w.empty(
                "driver",
                attrs!["iothread" => d.iothread.to_string(), "queues" => d.queues.to_string()],
            );
        }
        write_pci_slot(w, c.pci_slot);
        w.close("controller");
    }
    for i in &dv.interfaces {
        w.open("interface", attrs!["type" => i.attachment.kind()]);
        if let Some(mac) = &i.mac {
            w.empty("mac", attrs!["address" => mac.as_str()]);
        }
        match &i.attachment {
            Attachment::Tap(tap) => {
                w.empty("target", attrs!["dev" => tap.as_str(), "managed" => "no"]);
                w.empty("model", attrs!["type" => i.model.as_str()]);
            }
            Attachment::Bridge(bridge) => {
                w.empty("source", attrs!["bridge" => bridge.as_str()]);
                w.empty("model", attrs!["type" => i.model.as_str()]);
            }
            Attachment::Passt {
                source_dev: _,
                log_file,
                port_forwards,
            }
            | Attachment::User {
                log_file,
                port_forwards,
            } => {
                if let Attachment::Passt { source_dev, .. } = &i.attachment {
                    w.empty("source", attrs!["dev" => source_dev.as_str()]);
                }
                w.empty("model", attrs!["type" => i.model.as_str()]);
                w.empty(
                    "backend",
                    attrs!["type" => "passt", "logFile" => p(log_file)],
                );
                for pf in port_forwards {
                    if pf.ranges.is_empty() {
                        w.empty("portForward", attrs!["proto" => pf.proto]);
                        continue;
                    }
                    w.open("portForward", attrs!["proto" => pf.proto]);
                    for r in &pf.ranges {
                        let mut a: Attrs<'_> = attrs!["start" => r.start.to_string()];
                        if let Some(to) = r.to {
                            a.push(("to", to.to_string().into()));
                        }
                        if r.exclude {
                            a.push(("exclude", "yes".into()));
                        }
                        w.empty("range", a);
                    }
                    w.close("portForward");
                }
            }
        }
        if let Some(m) = i.mtu {
            w.empty("mtu", attrs!["size" => m.to_string()]);
        }
        if let Some(b) = i.boot_order {
            w.empty("boot", attrs!["order" => b.to_string()]);
        }
        if i.rom_off {
            w.empty("rom", attrs!["enabled" => "no"]);
        }
        w.empty("alias", attrs!["name" => i.alias.as_str()]);
        write_pci_slot(w, i.pci_slot);
        w.close("interface");
    }
    for s in &dv.serials {
        w.open("serial", attrs!["type" => "unix"]);
        w.empty("source", attrs!["mode" => "bind", "path" => p(&s.socket)]);
        if let Some(log) = &s.log {
            w.empty("log", attrs!["file" => p(log), "append" => "on"]);
        }
        w.empty("target", attrs!["port" => s.port.to_string()]);
        w.close("serial");
    }
    for c in &dv.consoles {
        w.open("console", attrs!["type" => "pty"]);
        w.empty(
            "target",
            attrs!["type" => "serial", "port" => c.port.to_string()],
        );
        w.close("console");
    }
    for c in &dv.channels {
        w.open("channel", attrs!["type" => "unix"]);
        w.empty("source", attrs!["mode" => "bind", "path" => p(&c.socket)]);
        w.empty(
            "target",
            attrs!["type" => "virtio", "name" => c.target_name.as_str()],
        );
        w.close("channel");
    }
    for i in &dv.inputs {
        w.open(
            "input",
            attrs!["type" => i.kind.as_str(), "bus" => i.bus.as_str()],
        );
        w.empty("alias", attrs!["name" => i.alias.as_str()]);
        write_pci_slot(w, i.pci_slot);
        w.close("input");
    }
    for g in &dv.graphics {
        w.open("graphics", attrs!["type" => "vnc"]);
        w.empty(
            "listen",
            attrs!["type" => "socket", "socket" => p(&g.vnc_socket)],
        );
        w.close("graphics");
    }
    for v in &dv.videos {
        w.open("video", attrs![]);
        let mut a: Attrs<'_> = attrs!["type" => v.model.as_str(), "heads" => v.heads.to_string()];
        if let Some(vram) = v.vram {
            a.push(("vram", vram.to_string().into()));
        }
        w.empty("model", a);
        w.close("video");
    }
    if let Some(m) = &dv.memballoon {
        let mut a: Attrs<'_> = attrs!["model" => m.model.as_str()];
        if let Some(fpr) = m.free_page_reporting {
            a.push(("freePageReporting", on_off(fpr).into()));
        }
        if m.stats_period.is_none() && m.pci_slot.is_none() {
            w.empty("memballoon", a);
        } else {
            w.open("memballoon", a);
            if let Some(period) = m.stats_period {
                w.empty("stats", attrs!["period" => period.to_string()]);
            }
            write_pci_slot(w, m.pci_slot);
            w.close("memballoon");
        }
    }
    for r in &dv.rngs {
        w.open("rng", attrs!["model" => r.model.as_str()]);
        w.leaf("backend", attrs!["model" => "random"], &p(&r.backend));
        write_pci_slot(w, r.pci_slot);
        w.close("rng");
    }
    for wd in &dv.watchdogs {
        w.open(
            "watchdog",
            attrs!["model" => wd.model, "action" => wd.action],
        );
        w.empty("alias", attrs!["name" => wd.alias.as_str()]);
        write_pci_slot(w, wd.pci_slot);
        w.close("watchdog");
    }
    for snd in &dv.sounds {
        w.open("sound", attrs!["model" => snd.model]);
        w.empty("alias", attrs!["name" => snd.alias.as_str()]);
        w.close("sound");
    }
    w.close("devices");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_drops_controls() {
        let mut s = String::new();
        escape("a<b>&\"c'\0\u{1}\n", &mut s);
        assert_eq!(s, "a&lt;b&gt;&amp;&quot;c&apos;\u{fffd}\u{fffd}&#10;");
    }

    #[test]
    fn comment_cannot_be_closed_early() {
        let mut w = W {
            out: String::new(),
            depth: 0,
        };
        w.comment("a -- b -->");
        assert_eq!(w.out, "<!-- a - - b - -&gt; -->\n");
    }
}

//! Read side: libvirt's `dumpxml` output parsed into lenient structs (every field optional,
//! unknown elements ignored). Enough to list disks and interfaces of a running domain.

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("domain XML does not parse: {0}")]
    Parse(String),
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LiveDomain {
    #[serde(rename = "@type")]
    pub domain_type: Option<String>,
    #[serde(rename = "@id")]
    pub id: Option<String>,
    pub name: Option<String>,
    pub uuid: Option<String>,
    pub devices: Option<LiveDevices>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LiveDevices {
    pub disk: Vec<LiveDisk>,
    pub interface: Vec<LiveInterface>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LiveDisk {
    #[serde(rename = "@type")]
    pub disk_type: Option<String>,
    #[serde(rename = "@device")]
    pub device: Option<String>,
    pub driver: Option<LiveDriver>,
    pub source: Option<LiveSource>,
    pub target: Option<LiveTarget>,
    pub alias: Option<LiveAlias>,
    pub serial: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LiveDriver {
    #[serde(rename = "@name")]
    pub name: Option<String>,
    #[serde(rename = "@type")]
    pub format: Option<String>,
    #[serde(rename = "@cache")]
    pub cache: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LiveSource {
    #[serde(rename = "@file")]
    pub file: Option<String>,
    #[serde(rename = "@dev")]
    pub dev: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LiveTarget {
    #[serde(rename = "@dev")]
    pub dev: Option<String>,
    #[serde(rename = "@bus")]
    pub bus: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LiveAlias {
    #[serde(rename = "@name")]
    pub name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LiveInterface {
    #[serde(rename = "@type")]
    pub iface_type: Option<String>,
    pub mac: Option<LiveMac>,
    pub target: Option<LiveTarget>,
    pub alias: Option<LiveAlias>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LiveMac {
    #[serde(rename = "@address")]
    pub address: Option<String>,
}

impl LiveDomain {
    pub fn parse(xml: &str) -> Result<LiveDomain, DomainError> {
        quick_xml::de::from_str(xml).map_err(|e| DomainError::Parse(e.to_string()))
    }

    /// The disks, in document order.
    pub fn disks(&self) -> &[LiveDisk] {
        self.devices.as_ref().map_or(&[], |d| d.disk.as_slice())
    }
}

impl LiveDisk {
    /// A single `<disk>` element, as sent to libvirt to attach it: what the live domain shows
    /// of that disk once attached (libvirt keeps the type, source, driver, target and alias).
    pub fn parse(xml: &str) -> Result<LiveDisk, DomainError> {
        quick_xml::de::from_str(xml).map_err(|e| DomainError::Parse(e.to_string()))
    }

    pub fn target_dev(&self) -> Option<&str> {
        self.target.as_ref()?.dev.as_deref()
    }
    pub fn bus(&self) -> Option<&str> {
        self.target.as_ref()?.bus.as_deref()
    }
    pub fn alias(&self) -> Option<&str> {
        self.alias.as_ref()?.name.as_deref()
    }
    /// `source file=` or `source dev=`.
    pub fn source_path(&self) -> Option<&str> {
        let s = self.source.as_ref()?;
        s.file.as_deref().or(s.dev.as_deref())
    }
    /// The KubeVirt volume name, from an alias `ua-<volume>`.
    pub fn volume_name(&self) -> Option<&str> {
        self.alias()?.strip_prefix("ua-")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_disk_reads_as_the_live_domain_shows_it() {
        let disk = crate::domain::Disk {
            device: crate::domain::DiskDevice::Disk,
            source: crate::domain::DiskSource::Block("/dev/hp".into()),
            driver: crate::domain::Driver {
                format: "raw",
                cache: Some("none".into()),
                io: Some("native".into()),
                error_policy: Some("stop".into()),
                discard: Some("unmap"),
                iothread: None,
                iothread_pool: vec![],
                queues: None,
            },
            data_store: None,
            backing_store: None,
            target_dev: "vdc".into(),
            bus: "virtio".into(),
            tray: None,
            model: Some("virtio-non-transitional".into()),
            readonly: false,
            shareable: false,
            serial: None,
            boot_order: None,
            alias: "ua-hp".into(),
            blockio: None,
            reservations: None,
            address: None,
        };
        let l = LiveDisk::parse(&disk.to_xml()).expect("parses");
        assert_eq!(l.disk_type.as_deref(), Some("block"));
        assert_eq!(l.device.as_deref(), Some("disk"));
        assert_eq!(l.source_path(), Some("/dev/hp"));
        assert_eq!(l.target_dev(), Some("vdc"));
        assert_eq!(l.bus(), Some("virtio"));
        assert_eq!(l.volume_name(), Some("hp"));
        assert_eq!(l.driver.and_then(|d| d.cache).as_deref(), Some("none"));
    }

    const DUMP: &str = r#"<domain type='kvm' id='3'>
  <name>default_vm</name>
  <uuid>5b6c1e0e-3c39-4f5e-8c1c-8d3c3e1f2a10</uuid>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='/var/run/kubevirt-private/vmi-disks/root/disk.img' index='2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <alias name='ua-root'/>
      <address type='pci' domain='0x0000' bus='0x05' slot='0x00' function='0x0'/>
    </disk>
    <controller type='usb' index='0' model='none'><alias name='usb'/></controller>
    <interface type='ethernet'><mac address='52:54:00:aa:bb:cc'/><target dev='tap0' managed='no'/><alias name='ua-default'/></interface>
    <disk type='block' device='lun'>
      <source dev='/dev/data'/>
      <target dev='sda' bus='scsi'/>
      <alias name='ua-data'/>
    </disk>
    <serial type='unix'><target port='0'/></serial>
  </devices>
</domain>"#;

    #[test]
    fn lists_interleaved_disks() {
        let d = LiveDomain::parse(DUMP).expect("parses");
        assert_eq!(d.name.as_deref(), Some("default_vm"));
        assert_eq!(d.domain_type.as_deref(), Some("kvm"));
        let disks = d.disks();
        assert_eq!(disks.len(), 2);
        assert_eq!(disks[0].target_dev(), Some("vda"));
        assert_eq!(disks[0].volume_name(), Some("root"));
        assert_eq!(
            disks[0].source_path(),
            Some("/var/run/kubevirt-private/vmi-disks/root/disk.img")
        );
        assert_eq!(disks[1].bus(), Some("scsi"));
        assert_eq!(disks[1].source_path(), Some("/dev/data"));
        let ifs = &d.devices.as_ref().expect("devices").interface;
        assert_eq!(
            ifs[0].target.as_ref().and_then(|t| t.dev.as_deref()),
            Some("tap0")
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(LiveDomain::parse("<domain><name>x</domain>").is_err());
    }
}

//! Guest device names (`vda`, `sdb`, ..., `sdaa`) and the assignment rule KubeVirt uses:
//! names recorded in `status.volumeStatus[].target` are kept, the other disks fill the gaps in
//! spec order with the lowest free name of their prefix.

use std::collections::BTreeSet;

/// Device-name prefix for a bus: `vd` for virtio, `sd` for sata/scsi/usb.
pub fn prefix_for_bus(bus: &str) -> &'static str {
    if bus == "virtio" {
        "vd"
    } else {
        "sd"
    }
}

/// libvirt's disk name for a 0-based index: 0 → `a`, 25 → `z`, 26 → `aa`, 701 → `zz`, 702 → `aaa`.
pub fn drive_name(prefix: &str, index: usize) -> String {
    let mut letters = Vec::new();
    let mut i = index + 1;
    while i > 0 {
        i -= 1;
        letters.push(b'a' + (i % 26) as u8);
        i /= 26;
    }
    letters.reverse();
    let mut s = String::with_capacity(prefix.len() + letters.len());
    s.push_str(prefix);
    s.extend(letters.into_iter().map(char::from));
    s
}

/// Inverse of [`drive_name`]: `Some(index)` when `name` is `prefix` + 1..=4 lower-case letters.
pub fn drive_index(prefix: &str, name: &str) -> Option<usize> {
    let letters = name.strip_prefix(prefix)?;
    if letters.is_empty() || letters.len() > 4 || !letters.bytes().all(|c| c.is_ascii_lowercase()) {
        return None;
    }
    let mut idx = 0usize;
    for c in letters.bytes() {
        idx = idx * 26 + usize::from(c - b'a' + 1);
    }
    Some(idx - 1)
}

/// Assign names. `wanted[i] = (prefix, kept name from status)`; returns one name per entry.
/// A kept name is honoured when it matches the prefix and no earlier disk already holds it.
pub fn assign(wanted: &[(&'static str, Option<&str>)]) -> Vec<String> {
    let mut taken: BTreeSet<(&str, usize)> = BTreeSet::new();
    let mut out: Vec<Option<String>> = vec![None; wanted.len()];
    for (i, (prefix, kept)) in wanted.iter().enumerate() {
        if let Some(idx) = kept.and_then(|k| drive_index(prefix, k)) {
            if taken.insert((prefix, idx)) {
                out[i] = Some(drive_name(prefix, idx));
            }
        }
    }
    let mut next: std::collections::BTreeMap<&str, usize> = Default::default();
    for (i, (prefix, _)) in wanted.iter().enumerate() {
        if out[i].is_some() {
            continue;
        }
        let cursor = next.entry(prefix).or_insert(0);
        while taken.contains(&(*prefix, *cursor)) {
            *cursor += 1;
        }
        taken.insert((prefix, *cursor));
        out[i] = Some(drive_name(prefix, *cursor));
    }
    out.into_iter().map(Option::unwrap_or_default).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roundtrip() {
        for (i, n) in [
            (0, "vda"),
            (25, "vdz"),
            (26, "vdaa"),
            (27, "vdab"),
            (701, "vdzz"),
            (702, "vdaaa"),
        ] {
            assert_eq!(drive_name("vd", i), n);
            assert_eq!(drive_index("vd", n), Some(i));
        }
        assert_eq!(drive_index("vd", "sda"), None);
        assert_eq!(drive_index("vd", "vd"), None);
        assert_eq!(drive_index("vd", "vdA"), None);
        assert_eq!(drive_index("sd", "sda1"), None);
    }

    #[test]
    fn kept_names_win_and_gaps_fill_in_order() {
        let got = assign(&[
            ("vd", None),
            ("vd", Some("vda")),
            ("sd", None),
            ("vd", None),
            ("sd", Some("sdc")),
        ]);
        assert_eq!(got, ["vdb", "vda", "sda", "vdc", "sdc"]);
    }

    #[test]
    fn wrong_prefix_or_duplicate_kept_name_is_reassigned() {
        let got = assign(&[
            ("vd", Some("sda")),
            ("vd", Some("vdb")),
            ("vd", Some("vdb")),
        ]);
        assert_eq!(got, ["vda", "vdb", "vdc"]);
    }
}

/// The pod interface a network reaches the VM through, as KubeVirt's handler names it
/// (`pkg/network/namescheme`): the pod network's is `eth0` (or the name the VMI status
/// recorded), a secondary (Multus) network's is `pod` + the first 11 hex digits of the SHA-256
/// of the network's name.
pub fn pod_interface_name(network: &str, multus: bool, status_name: Option<&str>) -> String {
    if multus {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(network.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        return format!("pod{}", &hex[..11]);
    }
    status_name.unwrap_or("eth0").to_string()
}

/// The tap device the handler's phase 1 creates for a network (`pkg/network/link/names.go`):
/// `tap0` for the pod network, `tap` + the hash of a Multus pod interface otherwise.
pub fn tap_name(pod_interface: &str, multus: bool) -> String {
    if multus {
        format!("tap{}", pod_interface.get(3..).unwrap_or_default())
    } else {
        "tap0".to_string()
    }
}

/// The in-pod bridge between the pod interface and the tap (`k6t-eth0`, `k6t-<hash>`).
pub fn bridge_name(pod_interface: &str) -> String {
    format!(
        "k6t-{}",
        pod_interface.strip_prefix("pod").unwrap_or(pod_interface)
    )
}

/// A MAC for an interface the VMI gives none: locally administered, unicast, derived from the
/// VMI's identity (`uid`, else `namespace/name`) and the interface's name, so the same VMI gets
/// the same MAC on every start, in every pod and after a migration.
pub fn stable_mac(vmi_key: &str, interface: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("{vmi_key}/{interface}").as_bytes());
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        d[0], d[1], d[2], d[3], d[4]
    )
}

#[cfg(test)]
mod net_tests {
    use super::*;

    #[test]
    fn multus_names_follow_kubevirt() {
        // sha256("red") = b1f51a511f1da0cd348b8f8598db32e61cb963e5fc69e2b41485bf99590ed75a
        let pod = pod_interface_name("red", true, None);
        assert_eq!(pod, "podb1f51a511f1");
        assert_eq!(tap_name(&pod, true), "tapb1f51a511f1");
        assert_eq!(bridge_name(&pod), "k6t-b1f51a511f1");
        assert_eq!(pod_interface_name("default", false, None), "eth0");
        assert_eq!(tap_name("eth0", false), "tap0");
        assert_eq!(bridge_name("eth0"), "k6t-eth0");
    }

    #[test]
    fn stable_macs_are_unicast_local_and_differ_per_interface() {
        let a = stable_mac("uid-1", "default");
        assert_eq!(a, stable_mac("uid-1", "default"));
        assert_ne!(a, stable_mac("uid-1", "other"));
        assert_ne!(a, stable_mac("uid-2", "default"));
        assert!(a.starts_with("02:"));
        assert_eq!(a.len(), 17);
    }
}

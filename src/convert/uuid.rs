//! UUID checks and KubeVirt's name-based firmware UUID (UUIDv5 = SHA-1 over namespace + name),
//! both from the `uuid` crate.

/// KubeVirt's namespace for firmware UUIDs derived from a VM name (`firmwareUUIDns`).
const FIRMWARE_UUID_NS: [u8; 16] = [
    0x6a, 0x1a, 0x24, 0xa1, 0x40, 0x61, 0x46, 0x07, 0x8b, 0xf4, 0xa3, 0x96, 0x3d, 0x0c, 0x58, 0x95,
];

/// Is `s` a UUID in the canonical 8-4-4-4-12 hex form (either case)?
pub fn is_uuid(s: &str) -> bool {
    // The only 36-character form the parser takes is the hyphenated one.
    s.len() == 36 && uuid::Uuid::try_parse(s).is_ok()
}

/// UUIDv5 (SHA-1 of namespace + name) of `name` in KubeVirt's firmware namespace, lower-case.
pub fn firmware_uuid_from_name(name: &str) -> String {
    let ns = uuid::Uuid::from_bytes(FIRMWARE_UUID_NS);
    uuid::Uuid::new_v5(&ns, name.as_bytes()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values computed independently (Python's `uuid.uuid5` over the same namespace), and
    /// the same as the hand-written SHA-1 this replaced gave.
    #[test]
    fn uuid_v5_known_values() {
        assert_eq!(
            firmware_uuid_from_name("my-vm"),
            "41256f5f-3759-54d0-9c60-26dff9079ab1"
        );
        assert_eq!(
            firmware_uuid_from_name("testvmi"),
            "f8918e71-270a-598e-a2a4-1afac39e1394"
        );
    }

    #[test]
    fn uuid_v5_shape_and_stability() {
        let u = firmware_uuid_from_name("my-vm");
        assert!(is_uuid(&u), "{u}");
        assert_eq!(&u[14..15], "5");
        assert_eq!(u, firmware_uuid_from_name("my-vm"));
        assert_ne!(u, firmware_uuid_from_name("my-vm2"));
        assert!(!is_uuid("not-a-uuid"));
        assert!(is_uuid("0C9F7A6E-2f7d-4c57-9a59-8b3f6a0c2d11"));
    }
}

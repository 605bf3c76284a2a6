//! The network file systems whose locks cannot be trusted to exclude, by `statfs` magic.
//! Must not: decide what to do about them (`dir.rs` refuses them unless allowed).

/// Names file systems whose locks cannot be trusted to exclude (or may hang), by `statfs` magic.
pub(super) fn network_fs_name(f_type: i64) -> Option<&'static str> {
    // Magic numbers from linux/magic.h and the file systems' own headers.
    Some(match f_type as u32 {
        0x6969 => "nfs",
        0x517B => "smb",
        0xFF53_4D42 => "cifs",
        0xFE53_4D42 => "smb2",
        0x564C => "ncp",
        0x0102_1997 => "9p",
        0x00C3_6400 => "ceph",
        0x5346_414F => "afs",
        0x6B41_4653 => "kafs",
        0x7375_7245 => "coda",
        0x0BD0_0BD0 => "lustre",
        0x4750_4653 => "gpfs",
        0x0116_1970 => "gfs2",
        0x7461_636F => "ocfs2",
        0x6573_5546 => "fuse",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_network_file_systems() {
        assert_eq!(network_fs_name(0x6969), Some("nfs"));
        assert_eq!(network_fs_name(0xFF53_4D42), Some("cifs"));
        assert_eq!(network_fs_name(0xFE53_4D42), Some("smb2"));
        assert_eq!(network_fs_name(0x517B), Some("smb"));
        assert_eq!(network_fs_name(0x00C3_6400), Some("ceph"));
        assert_eq!(network_fs_name(0x0102_1997), Some("9p"));
        assert_eq!(network_fs_name(0x6573_5546), Some("fuse"));
        // statfs reports f_type as a signed long: CIFS's magic arrives sign-extended.
        assert_eq!(network_fs_name(0xFF53_4D42_u32 as i32 as i64), Some("cifs"));
        // Local ones pass.
        for local in [
            0x0102_1994_i64, /* tmpfs */
            0xEF53,          /* ext4 */
            0x5846_5342,     /* xfs */
            0x9123_683E,     /* btrfs */
            0x794C_7630,     /* overlayfs */
        ] {
            assert_eq!(network_fs_name(local), None, "{local:#x}");
        }
    }

    #[test]
    fn this_machines_tmp_is_local() {
        let fs = rustix::fs::statfs("/tmp").expect("statfs /tmp");
        assert_eq!(network_fs_name(fs.f_type as i64), None);
    }
}

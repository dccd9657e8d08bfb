//! `cargo xtask guests [--touch SIZE] [--out DIR]`: writes the project's boot sectors
//! (`ab.bin`, `random.bin`, made by `vmm_glue::guest::boot_sector`).
//!
//! With no options it regenerates the committed images in `guests/` exactly (touch
//! size 64 MiB), so `git diff --exit-code guests/` stays clean. `--touch` makes
//! sectors that run over another amount of memory (`--touch 512M` for a 1 GiB guest
//! half of whose RAM is dirtied pass after pass); such sectors go to `--out DIR`:
//! `guests/` only ever holds the default images, which a unit test checks against
//! the generator. `cargo xtask bench --vs-qemu` makes its 512 MiB sector through the
//! same [`write_sectors`].

use std::path::{Path, PathBuf};

use vmm_glue::guest::boot_sector::{self, BootSector, DEFAULT_TOUCH};

/// `cargo xtask guests`' command line.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Memory each sector runs over from 1 MiB: bytes, or with a K, M or G suffix
    /// (binary units), a multiple of 4 KiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64M")]
    pub touch: u64,
    /// Directory to write ab.bin and random.bin into (created if missing); default:
    /// guests/ of the workspace, which takes only the default touch size.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

pub use vmm_glue::parse_size;

/// `bytes` as `512 MiB` when it is a whole number of MiB, else as bytes.
pub fn show_size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// The workspace's `guests/` directory.
pub fn committed_dir() -> Result<PathBuf, String> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|root| root.join("guests"))
        .ok_or_else(|| "no workspace root above xtask/".into())
}

/// Writes every boot sector the project ships into `dir` (created if missing) under
/// its usual file name, running over `touch` bytes from 1 MiB; returns each sector
/// and the path written.
pub fn write_sectors(dir: &Path, touch: u64) -> Result<Vec<(BootSector, PathBuf)>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    BootSector::ALL
        .into_iter()
        .map(|s| {
            let path = dir.join(s.file_name());
            let sector = s
                .generate(touch)
                .map_err(|e| format!("{} boot sector: {e}", s.name()))?;
            std::fs::write(&path, sector)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok((s, path))
        })
        .collect()
}

/// Writes the sectors and says where.
pub fn main(a: &Args) -> Result<bool, String> {
    let committed = committed_dir()?;
    let dir = a.out.clone().unwrap_or_else(|| committed.clone());
    if a.touch != DEFAULT_TOUCH && same_dir(&dir, &committed) {
        return Err(format!(
            "{} holds the committed images (touch {}), which a unit test checks against \
             the generator: write a {} sector elsewhere with --out DIR",
            committed.display(),
            show_size(DEFAULT_TOUCH),
            show_size(a.touch)
        ));
    }
    if a.out.is_none() {
        // The committed images, by the generator's own writer.
        let paths = boot_sector::write_images(&dir).map_err(|e| vmm_glue::error_chain(&e))?;
        for p in paths {
            println!("{}: touch {}", p.display(), show_size(DEFAULT_TOUCH));
        }
        return Ok(true);
    }
    for (s, p) in write_sectors(&dir, a.touch)? {
        println!(
            "{}: {} boot sector, touch {} (a guest needs at least {})",
            p.display(),
            s.name(),
            show_size(a.touch),
            show_size(boot_sector::TOUCH_START + a.touch)
        );
    }
    Ok(true)
}

/// Whether `a` and `b` name the same directory (either may not exist yet).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        for bad in ["", "M", "1.5G", "-1M", "12T", "99999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(show_size(512 << 20), "512 MiB");
        assert_eq!(show_size(4096), "4096 bytes");
    }

    #[test]
    fn sectors_carry_the_touch_size_and_default_ones_match_the_committed_images() {
        let dir = std::env::temp_dir().join(format!("xtask-guests-{}", std::process::id()));
        let written = write_sectors(&dir, 512 << 20).unwrap();
        assert_eq!(written.len(), BootSector::ALL.len());
        for (s, p) in &written {
            let bytes: [u8; boot_sector::SECTOR_SIZE] =
                std::fs::read(p).unwrap().try_into().unwrap();
            assert_eq!(boot_sector::touch(&bytes), 512 << 20, "{}", s.name());
            assert_eq!(bytes, s.generate(512 << 20).unwrap());
        }
        write_sectors(&dir, DEFAULT_TOUCH).unwrap();
        let committed = committed_dir().unwrap();
        for s in BootSector::ALL {
            assert_eq!(
                std::fs::read(dir.join(s.file_name())).unwrap(),
                std::fs::read(committed.join(s.file_name())).unwrap(),
                "{}",
                s.name()
            );
        }
        assert!(write_sectors(&dir, 4095).is_err(), "not whole pages");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_non_default_touch_never_lands_in_the_committed_directory() {
        let e = main(&Args {
            touch: 512 << 20,
            out: None,
        })
        .unwrap_err();
        assert!(e.contains("--out"), "{e}");
        let e = main(&Args {
            touch: 512 << 20,
            out: Some(committed_dir().unwrap()),
        })
        .unwrap_err();
        assert!(e.contains("committed"), "{e}");
    }
}

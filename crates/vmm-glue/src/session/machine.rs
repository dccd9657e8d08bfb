//! The VM a session migrates, as the VMM hands it over: guest RAM, a dirty
//! log, vCPUs and device-state sections.

use std::sync::Arc;

use migration_ram::balloon::BalloonInhibitor;
use migration_ram::postcopy::MlockMode;
use migration_ram::{DirtyLog, GuestMemoryMmap, RamBlock, RamBlocks};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::state::{DeviceState, Vcpus};

/// How one vm-memory region of guest RAM migrates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamRegion {
    /// Its name on the wire (`pc.ram`, `mem0`): source and destination must
    /// agree on it. 1 to 256 bytes of UTF-8, unique.
    pub name: String,
    /// The host page size that backs it: 4 KiB, or 2 MiB for hugetlbfs. Pages
    /// move, are requested and are placed whole.
    pub page_size: u32,
}

impl RamRegion {
    /// A region of 4 KiB host pages.
    pub fn new(name: impl Into<String>) -> Self {
        RamRegion {
            name: name.into(),
            page_size: migration_ram::DEFAULT_PAGE_SIZE,
        }
    }

    /// A region of `page_size` host pages.
    pub fn with_page_size(name: impl Into<String>, page_size: u32) -> Self {
        RamRegion {
            name: name.into(),
            page_size,
        }
    }
}

/// Guest RAM: the VMM's vm-memory regions, each named and with its host page
/// size.
#[derive(Debug, Clone)]
pub struct GuestRam {
    mem: Arc<GuestMemoryMmap>,
    regions: Vec<RamRegion>,
    locked: Option<MlockMode>,
}

impl GuestRam {
    /// `regions` names the regions of `mem` in address order, one each.
    /// Fails when the count differs, or a name, size or page size breaks the
    /// wire format's rules.
    pub fn new(
        mem: Arc<GuestMemoryMmap>,
        regions: Vec<RamRegion>,
    ) -> Result<GuestRam, migration_ram::Error> {
        let ram = GuestRam {
            mem,
            regions,
            locked: None,
        };
        ram.blocks()?;
        Ok(ram)
    }

    /// Says the VMM locked guest memory in RAM (`mlock`) with `mode`: a
    /// postcopy destination unlocks it while postcopy runs (locked memory and
    /// missing pages do not mix) and locks it again at the end.
    pub fn with_locked(mut self, mode: MlockMode) -> GuestRam {
        self.locked = Some(mode);
        self
    }

    /// How the VMM locked guest memory, if it did.
    pub fn locked(&self) -> Option<MlockMode> {
        self.locked
    }

    /// The guest memory.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    /// The regions, in address order.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Fresh RAM blocks over the regions (clear dirty and received bitmaps),
    /// for one migration.
    pub fn blocks(&self) -> Result<RamBlocks, migration_ram::Error> {
        if self.regions.len() != self.mem.num_regions() {
            return Err(migration_ram::Error::NameCount {
                regions: self.mem.num_regions(),
                names: self.regions.len(),
            });
        }
        let blocks = self
            .mem
            .iter()
            .zip(&self.regions)
            .map(|(r, spec)| RamBlock::new(&spec.name, r.start_addr(), r.len(), spec.page_size))
            .collect::<Result<Vec<_>, _>>()?;
        RamBlocks::new(blocks)
    }
}

/// Everything a session migrates.
pub struct Machine {
    ram: GuestRam,
    dirty_log: Arc<dyn DirtyLog>,
    vcpus: Arc<dyn Vcpus>,
    devices: Vec<Arc<dyn DeviceState>>,
    balloon: Arc<BalloonInhibitor>,
}

/// Why a machine could not be assembled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MachineError {
    /// Two devices share a name.
    #[error("two devices are named {0:?}")]
    DuplicateDevice(String),
    /// A device name is empty or longer than 200 bytes.
    #[error("device name {0:?} must be 1 to 200 bytes")]
    BadDeviceName(String),
}

/// Longest device name, leaving room for the session's prefix within the
/// wire format's 256 bytes.
pub const MAX_DEVICE_NAME: usize = 200;

impl Machine {
    /// A machine with no device sections yet.
    pub fn new(ram: GuestRam, dirty_log: Arc<dyn DirtyLog>, vcpus: Arc<dyn Vcpus>) -> Machine {
        Machine {
            ram,
            dirty_log,
            vcpus,
            devices: Vec::new(),
            balloon: Arc::default(),
        }
    }

    /// Shares `inhibitor` with the VMM's balloon device: the session holds it
    /// while postcopy runs (a page given back then would look missing), and
    /// the balloon asks it before giving pages back.
    pub fn with_balloon_inhibitor(mut self, inhibitor: Arc<BalloonInhibitor>) -> Machine {
        self.balloon = inhibitor;
        self
    }

    /// The balloon inhibitor (a fresh one unless the VMM gave its own).
    pub fn balloon_inhibitor(&self) -> &Arc<BalloonInhibitor> {
        &self.balloon
    }

    /// Registers a device's state section.
    pub fn with_device(mut self, device: Arc<dyn DeviceState>) -> Result<Machine, MachineError> {
        let name = device.name();
        if name.is_empty() || name.len() > MAX_DEVICE_NAME {
            return Err(MachineError::BadDeviceName(name.to_owned()));
        }
        if self.devices.iter().any(|d| d.name() == name) {
            return Err(MachineError::DuplicateDevice(name.to_owned()));
        }
        self.devices.push(device);
        Ok(self)
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The dirty log a source session reads.
    pub fn dirty_log(&self) -> &Arc<dyn DirtyLog> {
        &self.dirty_log
    }

    /// The vCPUs.
    pub fn vcpus(&self) -> &Arc<dyn Vcpus> {
        &self.vcpus
    }

    /// The device sections, in registration (and load) order.
    pub fn devices(&self) -> &[Arc<dyn DeviceState>] {
        &self.devices
    }
}

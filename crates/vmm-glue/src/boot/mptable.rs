//! The MP table (Intel MultiProcessor Specification 1.4) that tells a guest
//! kernel how many CPUs it has, where its IOAPIC is and how the ISA
//! interrupts reach it, on a PC without ACPI tables.
//!
//! Linux looks for the floating pointer structure (`_MP_`) in the last KiB
//! of base memory, among other places; it points at the configuration
//! table (`PCMP`). Both are written below 640 KiB:
//!
//! | guest-physical | what |
//! | --- | --- |
//! | [`MPTABLE_CONFIG`] | configuration table: header, then one entry per processor, the ISA bus, the IOAPIC, 16 I/O interrupt assignments and the two local interrupts |
//! | [`MPTABLE_FLOATING`] | the 16-byte floating pointer |
//!
//! [`MPTABLE_START`]`..`[`MPTABLE_END`] must be reserved (not RAM) in the
//! guest's memory map. The routing matches KVM's in-kernel irqchip with
//! its default GSI routing: ISA IRQ `n` on IOAPIC pin `n`, LINT0 ExtINT
//! (the PIC) and LINT1 NMI on every LAPIC. APIC ids are the vCPU indices
//! (as `KVM_CREATE_VCPU` is given them); the IOAPIC's id is the vCPU count.

use vm_memory::{Bytes, GuestAddress};

use crate::GuestMemoryMmap;

/// Start of the area the MP table lives in (reserve it in the e820 map).
pub const MPTABLE_START: u64 = 0x9_f000;
/// End of that area: the end of base memory (640 KiB).
pub const MPTABLE_END: u64 = 0xa_0000;
/// Where the configuration table goes.
pub const MPTABLE_CONFIG: u64 = MPTABLE_START;
/// Where the floating pointer goes: the last KiB of base memory, where
/// Linux scans for it.
pub const MPTABLE_FLOATING: u64 = 0x9_fc00;
/// The IOAPIC's MMIO base (KVM's in-kernel IOAPIC answers there).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The LAPICs' MMIO base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// ISA interrupts routed to the IOAPIC (pins 0 to 15).
const ISA_IRQS: u8 = 16;

/// Entry types (MP spec table 4-3).
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
/// Interrupt types (MP spec table 4-10).
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Processor entry flags.
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// The LAPIC version a processor entry reports (an integrated APIC).
const LAPIC_VERSION: u8 = 0x14;
/// The IOAPIC version (KVM's IOAPIC reports 0x11).
const IOAPIC_VERSION: u8 = 0x11;
/// MP spec revision 1.4.
const SPEC_REV: u8 = 4;

/// Why the MP table cannot be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MpTableError {
    /// Too many vCPUs for the table's room below 640 KiB, or none.
    #[error("an MP table for {vcpus} vCPUs does not fit ({bytes} bytes, room for {room})")]
    TooManyVcpus {
        /// vCPUs asked for.
        vcpus: usize,
        /// Bytes the configuration table would take.
        bytes: usize,
        /// Bytes available.
        room: usize,
    },
    /// Guest memory does not cover the table's area.
    #[error("cannot write the MP table at {addr:#x}")]
    Memory {
        /// Where.
        addr: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// The configuration table for `vcpus` vCPUs, as bytes (checksummed),
/// meant for guest address [`MPTABLE_CONFIG`].
pub fn config_table(vcpus: usize) -> Result<Vec<u8>, MpTableError> {
    let room = (MPTABLE_FLOATING - MPTABLE_CONFIG) as usize;
    let bytes = 44 + 20 * vcpus + 8 + 8 + 8 * usize::from(ISA_IRQS) + 2 * 8;
    let ioapic_id = u8::try_from(vcpus).ok().filter(|&id| id < 0xff);
    let Some(ioapic_id) = ioapic_id.filter(|_| bytes <= room && vcpus > 0) else {
        return Err(MpTableError::TooManyVcpus { vcpus, bytes, room });
    };
    let mut entries: Vec<u8> = Vec::with_capacity(bytes - 44);
    let mut count: u16 = 0;
    for id in 0..ioapic_id {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, LAPIC_VERSION, flags]);
        // CPU signature (family 6) and feature flags (FPU, APIC), then
        // eight reserved bytes.
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // Flags 0: polarity and trigger conform to the bus (ISA: active
        // high, edge). Source bus 0, source IRQ, destination IOAPIC, pin.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        // Destination 0xff: every LAPIC.
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, 0, 0, 0xff, lint]);
        count += 1;
    }
    let mut t = Vec::with_capacity(bytes);
    t.extend_from_slice(b"PCMP");
    let len =
        u16::try_from(bytes).map_err(|_| MpTableError::TooManyVcpus { vcpus, bytes, room })?;
    t.extend_from_slice(&len.to_le_bytes());
    t.push(SPEC_REV);
    t.push(0); // checksum, below
    t.extend_from_slice(b"RUST-VMM");
    t.extend_from_slice(b"DEMOVM      ");
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&count.to_le_bytes());
    t.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    t.push(0); // extended table checksum
    t.push(0); // reserved
    debug_assert_eq!(t.len(), 44);
    t.extend_from_slice(&entries);
    debug_assert_eq!(t.len(), bytes);
    t[7] = checksum(&t);
    Ok(t)
}

/// The floating pointer structure pointing at [`MPTABLE_CONFIG`].
pub fn floating_pointer() -> [u8; 16] {
    let mut f = [0u8; 16];
    f[..4].copy_from_slice(b"_MP_");
    // The configuration table is below 640 KiB: it fits 32 bits.
    f[4..8].copy_from_slice(&(MPTABLE_CONFIG as u32).to_le_bytes());
    f[8] = 1; // length in 16-byte units
    f[9] = SPEC_REV;
    // f[10]: checksum; f[11..16]: feature bytes, 0 = a configuration
    // table is present.
    f[10] = checksum(&f);
    f
}

/// The byte that makes `bytes` sum to zero (the MP spec's checksum).
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// Writes the MP table for `vcpus` vCPUs into guest memory (see the module
/// documentation for where).
pub fn write(mem: &GuestMemoryMmap, vcpus: usize) -> Result<(), MpTableError> {
    let table = config_table(vcpus)?;
    let put = |addr: u64, data: &[u8]| {
        mem.write_slice(data, GuestAddress(addr))
            .map_err(|source| MpTableError::Memory { addr, source })
    };
    put(MPTABLE_CONFIG, &table)?;
    put(MPTABLE_FLOATING, &floating_pointer())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn tables_sum_to_zero_and_count_their_entries() {
        for n in [1, 2, 64] {
            let t = config_table(n).unwrap();
            assert_eq!(sum(&t), 0, "{n} vCPUs");
            assert_eq!(&t[..4], b"PCMP");
            assert_eq!(usize::from(u16::from_le_bytes([t[4], t[5]])), t.len());
            let count = usize::from(u16::from_le_bytes([t[34], t[35]]));
            assert_eq!(count, n + 1 + 1 + 16 + 2);
            // The entries: n processors first, vCPU 0 the BSP.
            assert_eq!(t[44..48], [ENTRY_PROCESSOR, 0, LAPIC_VERSION, 3]);
            assert_eq!(t[64 + 1], u8::from(n > 1), "the second entry");
        }
        let f = floating_pointer();
        assert_eq!(sum(&f), 0);
        assert_eq!(&f[..4], b"_MP_");
    }

    #[test]
    fn the_serial_interrupt_reaches_ioapic_pin_4() {
        let t = config_table(2).unwrap();
        let io: Vec<&[u8]> = t[44 + 2 * 20..]
            .chunks(8)
            .filter(|e| e[0] == ENTRY_IO_INTERRUPT)
            .collect();
        let irq4 = io.iter().find(|e| e[5] == 4).unwrap();
        assert_eq!(
            (irq4[6], irq4[7]),
            (2, 4),
            "IOAPIC id 2 (after the vCPUs), pin 4"
        );
    }

    #[test]
    fn too_many_vcpus_is_an_error() {
        assert!(matches!(
            config_table(200),
            Err(MpTableError::TooManyVcpus { vcpus: 200, .. })
        ));
        assert!(config_table(0).is_err());
    }
}

//! How the machine's state travels: every section is a `DeviceState` command
//! of the stream, named by its owner.
//!
//! | name              | what                                                  |
//! |-------------------|-------------------------------------------------------|
//! | `cpus/<section>`  | a section of [`Vcpus::save_state`](super::Vcpus)      |
//! | `dev/<device>`    | a registered [`DeviceState`](super::DeviceState)      |
//! | `session/global`  | version 1, one byte: 1 if the guest ran on the source |
//!
//! The destination loads devices in its registration order, then the vCPUs;
//! a device the source did not send, or a section nobody here owns, fails the
//! migration with a protocol error before anything is loaded.

use std::collections::HashMap;
use std::io::Write;

use migration_stream::{
    BlockGeometry, BlockId, BlockResolver, Command, DeviceState as WireState, Record, StreamReader,
    StreamWriter,
};

use super::error::SessionError;
use super::machine::Machine;
use super::state::Section;

const VCPU_PREFIX: &str = "cpus/";
const DEVICE_PREFIX: &str = "dev/";
const GLOBAL: &str = "session/global";
const GLOBAL_VERSION: u32 = 1;

/// Writes the vCPU sections, the device sections and the global state (the
/// vCPUs are paused).
pub(crate) fn write_state<W: Write>(
    w: &mut StreamWriter<W>,
    machine: &Machine,
    was_running: bool,
) -> Result<(), SessionError> {
    write_sections(w, sections(machine, was_running)?)
}

/// Writes `sections` as `DeviceState` commands.
pub(crate) fn write_sections<W: Write>(
    w: &mut StreamWriter<W>,
    sections: Vec<WireState>,
) -> Result<(), SessionError> {
    for s in sections {
        w.write_command(&Command::DeviceState(s))?;
    }
    Ok(())
}

/// The vCPU sections, the device sections and the global state, as they
/// travel (the vCPUs are paused).
pub(crate) fn sections(
    machine: &Machine,
    was_running: bool,
) -> Result<Vec<WireState>, SessionError> {
    let cpus = machine
        .vcpus()
        .save_state()
        .map_err(|e| SessionError::state("saving the vCPUs", e))?;
    let mut out: Vec<WireState> = cpus
        .into_iter()
        .map(|s| WireState {
            name: format!("{VCPU_PREFIX}{}", s.name),
            version: s.version,
            data: s.data,
        })
        .collect();
    for d in machine.devices() {
        let data = d
            .save()
            .map_err(|e| SessionError::state(format!("saving device {:?}", d.name()), e))?;
        out.push(WireState {
            name: format!("{DEVICE_PREFIX}{}", d.name()),
            version: d.version(),
            data,
        });
    }
    out.push(WireState {
        name: GLOBAL.into(),
        version: GLOBAL_VERSION,
        data: vec![u8::from(was_running)],
    });
    Ok(out)
}

/// `sections` as the bytes of `DeviceState` frames (a snapshot file keeps
/// them so; [`Received::accept_frames`] reads them back).
pub(crate) fn encode_sections(sections: Vec<WireState>) -> Result<Vec<u8>, SessionError> {
    let mut w = StreamWriter::new(Vec::new());
    write_sections(&mut w, sections)?;
    Ok(w.into_inner()?)
}

/// State sections have no pages: no block exists among them.
struct NoBlocks;

impl BlockResolver for NoBlocks {
    fn geometry(&self, _: BlockId) -> Option<BlockGeometry> {
        None
    }
}

/// The state sections a destination has received so far.
#[derive(Default)]
pub(crate) struct Received {
    cpus: Vec<Section>,
    devices: HashMap<String, (u32, Vec<u8>)>,
    source_running: Option<bool>,
}

impl Received {
    /// Files one section, refusing names nobody here owns and repeats.
    pub(crate) fn accept(&mut self, machine: &Machine, s: WireState) -> Result<(), SessionError> {
        if let Some(name) = s.name.strip_prefix(VCPU_PREFIX) {
            if self.cpus.iter().any(|c| c.name == name) {
                return Err(SessionError::Protocol(format!(
                    "vCPU section {name:?} sent twice"
                )));
            }
            self.cpus.push(Section::new(name, s.version, s.data));
        } else if let Some(name) = s.name.strip_prefix(DEVICE_PREFIX) {
            if !machine.devices().iter().any(|d| d.name() == name) {
                return Err(SessionError::Protocol(format!(
                    "the source sent state of device {name:?}, which this VM does not have"
                )));
            }
            if self
                .devices
                .insert(name.to_owned(), (s.version, s.data))
                .is_some()
            {
                return Err(SessionError::Protocol(format!(
                    "state of device {name:?} sent twice"
                )));
            }
        } else if s.name == GLOBAL {
            match (s.version, s.data.as_slice()) {
                (GLOBAL_VERSION, [r @ (0 | 1)]) => self.source_running = Some(*r == 1),
                _ => {
                    return Err(SessionError::Protocol(format!(
                        "malformed global state (version {}, {} bytes)",
                        s.version,
                        s.data.len()
                    )))
                }
            }
        } else {
            return Err(SessionError::Protocol(format!(
                "state section {:?} belongs to nothing this session knows",
                s.name
            )));
        }
        Ok(())
    }

    /// Files every section of `bytes`, `DeviceState` frames as
    /// [`encode_sections`] wrote them; anything else in them is a protocol
    /// error.
    pub(crate) fn accept_frames(
        &mut self,
        machine: &Machine,
        bytes: &[u8],
    ) -> Result<(), SessionError> {
        let mut r = StreamReader::for_package(bytes);
        loop {
            match r.read_record(&NoBlocks) {
                Ok(Record::Command(Command::DeviceState(d))) => self.accept(machine, d)?,
                Ok(other) => {
                    return Err(SessionError::Protocol(format!(
                        "unexpected record {other:?} among the state sections"
                    )))
                }
                // The sections end cleanly between two frames.
                Err(migration_stream::Error::Closed) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Checks that everything arrived, then loads the devices (in
    /// registration order) and the vCPUs; returns whether the guest ran on
    /// the source.
    pub(crate) fn apply(mut self, machine: &Machine) -> Result<bool, SessionError> {
        let running = self
            .source_running
            .ok_or_else(|| SessionError::Protocol("the stream carried no global state".into()))?;
        if self.cpus.is_empty() {
            return Err(SessionError::Protocol(
                "the stream carried no vCPU state".into(),
            ));
        }
        if let Some(d) = machine
            .devices()
            .iter()
            .find(|d| !self.devices.contains_key(d.name()))
        {
            return Err(SessionError::Protocol(format!(
                "the source sent no state for device {:?}",
                d.name()
            )));
        }
        for d in machine.devices() {
            if let Some((version, data)) = self.devices.remove(d.name()) {
                d.load(version, &data)
                    .map_err(|e| SessionError::state(format!("device {:?}", d.name()), e))?;
            }
        }
        machine
            .vcpus()
            .restore_state(&self.cpus)
            .map_err(|e| SessionError::state("vCPUs", e))?;
        Ok(running)
    }
}

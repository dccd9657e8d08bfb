//! The channels a source writes pages on.
//!
//! A migration has one main channel and, with postcopy preempt, a second
//! connection for the pages a faulting destination waits for
//! ([`Channel::Preempt`]), so they do not queue behind the background
//! stream. A [`PageScheduler`](crate::PageScheduler) names the channel of
//! each batch; the saver writes it through a [`ChannelSet`].
//!
//! A single [`StreamWriter`] is a set with only [`Channel::Main`];
//! [`Channels`] holds a main and an optional preempt writer. Asking a set
//! for a channel it lacks gives `None`, which the saver reports as
//! [`Error::NoChannel`](crate::Error::NoChannel) before it touches the
//! batch's pages.

use std::io::Write;

use migration_stream::StreamWriter;

/// A channel from source to destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Channel {
    /// The main channel: setup, background pages, commands, device state.
    Main,
    /// The postcopy preempt channel: pages the destination asked for.
    Preempt,
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Channel::Main => "main",
            Channel::Preempt => "preempt",
        })
    }
}

/// The writers of a source's channels.
pub trait ChannelSet {
    /// The byte sink under each channel's [`StreamWriter`].
    type Writer: Write;

    /// The writer of `channel`, if this set has it.
    fn channel(&mut self, channel: Channel) -> Option<&mut StreamWriter<Self::Writer>>;

    /// The main channel's writer (every set has one).
    fn main(&mut self) -> &mut StreamWriter<Self::Writer>;

    /// Whether this set has `channel`.
    fn has(&mut self, channel: Channel) -> bool {
        self.channel(channel).is_some()
    }
}

/// One writer is a set with only the main channel.
impl<W: Write> ChannelSet for StreamWriter<W> {
    type Writer = W;

    fn channel(&mut self, channel: Channel) -> Option<&mut StreamWriter<W>> {
        match channel {
            Channel::Main => Some(self),
            _ => None,
        }
    }

    fn main(&mut self) -> &mut StreamWriter<W> {
        self
    }
}

/// A main channel and an optional preempt channel.
#[derive(Debug)]
pub struct Channels<W: Write> {
    /// The main channel.
    pub main: StreamWriter<W>,
    /// The postcopy preempt channel, once it is connected.
    pub preempt: Option<StreamWriter<W>>,
}

impl<W: Write> Channels<W> {
    /// A set with only `main`.
    pub fn new(main: StreamWriter<W>) -> Self {
        Channels {
            main,
            preempt: None,
        }
    }

    /// A set with both channels.
    pub fn with_preempt(main: StreamWriter<W>, preempt: StreamWriter<W>) -> Self {
        Channels {
            main,
            preempt: Some(preempt),
        }
    }
}

impl<W: Write> ChannelSet for Channels<W> {
    type Writer = W;

    fn channel(&mut self, channel: Channel) -> Option<&mut StreamWriter<W>> {
        match channel {
            Channel::Main => Some(&mut self.main),
            Channel::Preempt => self.preempt.as_mut(),
        }
    }

    fn main(&mut self) -> &mut StreamWriter<W> {
        &mut self.main
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_has_only_main_and_channels_what_they_hold() {
        let mut w = StreamWriter::new(Vec::new());
        assert!(w.has(Channel::Main));
        assert!(!w.has(Channel::Preempt));
        let mut c = Channels::new(StreamWriter::new(Vec::new()));
        assert!(!c.has(Channel::Preempt));
        c.preempt = Some(StreamWriter::new(Vec::new()));
        assert!(c.has(Channel::Preempt));
        c.channel(Channel::Preempt)
            .unwrap()
            .write_end_of_section()
            .unwrap();
        assert_eq!(c.main().bytes_written(), 0);
        assert_eq!(c.preempt.as_ref().unwrap().bytes_written(), 2);
        assert_eq!(Channel::Preempt.to_string(), "preempt");
    }
}

//! The live sessions, compactly: a million of them may be live at once.
//!
//! One hash-table entry of 56 bytes a live stream, holding its stream id inline when the id is
//! short (no allocation of its own), its session, and the place it is pushed to: the `app` and
//! `appname` pair, interned once and named by a number. Nothing is lossy: stream ids of any
//! length are kept exactly, and every (app, appname) keeps its own place. A place is forgotten
//! when its last stream ends, so pushes to ever new paths (an `appname` is whatever the push URL
//! says) do not make the table grow for good.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use super::rules::{Sequence, Session};
use super::{FastMap, FastSet};
use crate::area::Area;
use crate::callback::StreamKey;

/// Stream ids of up to this many bytes are kept inline.
const SHORT: usize = 22;

/// A stream id: inline when short, else on the heap.
#[derive(Debug)]
enum StreamId {
    Short {
        /// How many of `bytes` are the id.
        len: u8,
        /// The id, then zeros.
        bytes: [u8; SHORT],
    },
    Long(Box<str>),
}

impl StreamId {
    fn new(id: &str) -> Self {
        match u8::try_from(id.len()) {
            Ok(len) if id.len() <= SHORT => {
                let mut bytes = [0; SHORT];
                bytes[..id.len()].copy_from_slice(id.as_bytes());
                StreamId::Short { len, bytes }
            }
            _ => StreamId::Long(id.into()),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            StreamId::Short { len, bytes } => &bytes[..usize::from(*len)],
            StreamId::Long(id) => id.as_bytes(),
        }
    }
}

/// One live stream and its session.
#[derive(Debug)]
struct Entry {
    /// Number of the stream's (`app`, `appname`) in [`Live::slots`]; part of what the entry is
    /// found by.
    place: u32,
    /// The stream id, the rest of what the entry is found by.
    id: StreamId,
    /// The live session's id: only a disconnect with it ends the session.
    sequence: Sequence,
    /// When the session started, in unix seconds.
    since: i64,
    /// Where the session was pushed: its `area` label while live.
    area: Area,
}

impl Entry {
    fn session(&self) -> Session {
        Session {
            sequence: self.sequence.clone(),
            area: self.area,
            since: self.since,
        }
    }
}

/// What identifies a live stream: lets the table be searched without building an entry.
trait Key {
    fn place(&self) -> u32;
    fn id(&self) -> &[u8];
}

impl Key for Entry {
    fn place(&self) -> u32 {
        self.place
    }
    fn id(&self) -> &[u8] {
        self.id.as_bytes()
    }
}

/// A stream looked up by its place and stream id.
struct Probe<'a> {
    /// Number of the stream's (`app`, `appname`), looked up in `places`.
    place: u32,
    /// The stream id, borrowed from the caller's key.
    id: &'a str,
}

impl Key for Probe<'_> {
    fn place(&self) -> u32 {
        self.place
    }
    fn id(&self) -> &[u8] {
        self.id.as_bytes()
    }
}

impl Hash for dyn Key + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u32(self.place());
        self.id().hash(state);
    }
}

impl PartialEq for dyn Key + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.place() == other.place() && self.id() == other.id()
    }
}

impl Eq for dyn Key + '_ {}

impl Hash for Entry {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self as &dyn Key).hash(state)
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self as &dyn Key) == (other as &dyn Key)
    }
}

impl Eq for Entry {}

impl<'a> Borrow<dyn Key + 'a> for Entry {
    fn borrow(&self) -> &(dyn Key + 'a) {
        self
    }
}

/// The live session of every live stream.
#[derive(Debug, Default)]
pub(super) struct Live {
    /// One entry a live stream, found by place and stream id.
    entries: FastSet<Entry>,
    /// The place of each `app` and `appname` with a live stream.
    places: FastMap<Arc<str>, FastMap<Arc<str>, u32>>,
    /// Each place's strings and live streams, by its number; to forget a place when its last
    /// stream ends.
    slots: Vec<Slot>,
    /// Numbers of forgotten places, given to the next new ones.
    free: Vec<u32>,
    /// The place looked up last, tried first: restored sessions come ordered by place.
    last: Option<(Arc<str>, Arc<str>, u32)>,
}

/// A place: an (`app`, `appname`) pair with live streams.
#[derive(Debug)]
struct Slot {
    /// Push domain, the key of the place's map in `places`; dropped when the place is forgotten.
    app: Arc<str>,
    /// Push path, the place's key under `app` in `places`.
    appname: Arc<str>,
    /// Live streams pushed to this place; at 0 the place is forgotten and its number freed.
    live: u32,
}

impl Live {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Room for `n` more live streams.
    pub fn reserve(&mut self, n: usize) {
        self.entries.reserve(n);
    }

    /// Gives back most of the table once it is four times larger than needed.
    pub fn shrink(&mut self) {
        if self.entries.capacity() > 4 * self.entries.len().max(1024) {
            self.entries.shrink_to(2 * self.entries.len());
        }
    }

    /// The live session of a stream.
    pub fn get(&self, stream: &StreamKey) -> Option<Session> {
        let place = self.place(stream)?;
        self.entries
            .get(&Probe {
                place,
                id: &stream.stream_id,
            } as &dyn Key)
            .map(Entry::session)
    }

    /// The stream with `stream`'s `app` and stream id, under another `appname`, whose live
    /// session is `sequence`: where a disconnect that names no `appname` (or another one than
    /// its push did) finds its session. `appname` is not needed to account for an event, and a
    /// sequence is one push session's alone; an app has a few paths, so this is a few lookups.
    pub fn other_path(&self, stream: &StreamKey, sequence: &str) -> Option<(StreamKey, Session)> {
        let names = self.places.get(&*stream.app)?;
        names.iter().find_map(|(appname, place)| {
            if *appname == stream.appname {
                return None;
            }
            let entry = self.entries.get(&Probe {
                place: *place,
                id: &stream.stream_id,
            } as &dyn Key)?;
            (entry.sequence == *sequence).then(|| {
                let slot = &self.slots[*place as usize];
                let key = StreamKey {
                    app: slot.app.clone(),
                    appname: appname.clone(),
                    stream_id: stream.stream_id.clone(),
                };
                (key, entry.session())
            })
        })
    }

    /// Sets a stream's session (`None`: not live); returns the session before.
    pub fn set(&mut self, stream: &StreamKey, session: Option<Session>) -> Option<Session> {
        let before = match session {
            Some(s) => {
                let place = self.intern(stream);
                let before = self.entries.replace(Entry {
                    place,
                    id: StreamId::new(&stream.stream_id),
                    sequence: s.sequence,
                    since: s.since,
                    area: s.area,
                });
                if before.is_none() {
                    self.slots[place as usize].live += 1;
                }
                before
            }
            None => {
                let place = self.place(stream)?;
                let before = self.entries.take(&Probe {
                    place,
                    id: &stream.stream_id,
                } as &dyn Key);
                if before.is_some() {
                    self.ended(place);
                }
                before
            }
        };
        before.map(|e| Session {
            sequence: e.sequence,
            area: e.area,
            since: e.since,
        })
    }

    fn place(&self, stream: &StreamKey) -> Option<u32> {
        match &self.last {
            Some((app, appname, place)) if *app == stream.app && *appname == stream.appname => {
                Some(*place)
            }
            _ => self
                .places
                .get(&*stream.app)
                .and_then(|names| names.get(&*stream.appname))
                .copied(),
        }
    }

    fn intern(&mut self, stream: &StreamKey) -> u32 {
        if let Some((app, appname, place)) = &self.last {
            if *app == stream.app && *appname == stream.appname {
                return *place;
            }
        }
        // The strings already interned are the ones kept.
        let entry = self.places.entry(stream.app.clone());
        let app = entry.key().clone();
        let names = entry.or_default();
        let (appname, place) = match names.get_key_value(&*stream.appname) {
            Some((appname, place)) => (appname.clone(), *place),
            None => {
                let slot = Slot {
                    app: app.clone(),
                    appname: stream.appname.clone(),
                    live: 0,
                };
                let place = match self.free.pop() {
                    Some(place) => {
                        self.slots[place as usize] = slot;
                        place
                    }
                    None => {
                        // Fewer places than live streams, and those fit in memory.
                        let place = u32::try_from(self.slots.len()).expect("under 2^32 places");
                        self.slots.push(slot);
                        place
                    }
                };
                names.insert(stream.appname.clone(), place);
                (stream.appname.clone(), place)
            }
        };
        self.last = Some((app, appname, place));
        place
    }

    /// A stream of `place` ended: the place is forgotten with its last stream.
    fn ended(&mut self, place: u32) {
        let slot = &mut self.slots[place as usize];
        slot.live -= 1;
        if slot.live > 0 {
            return;
        }
        // The strings go now; the number waits for the next new place.
        let (app, appname) = (
            std::mem::take(&mut slot.app),
            std::mem::take(&mut slot.appname),
        );
        if let Some(names) = self.places.get_mut(&app) {
            names.remove(&appname);
            if names.is_empty() {
                self.places.remove(&app);
            }
        }
        if self.last.as_ref().is_some_and(|(_, _, p)| *p == place) {
            self.last = None;
        }
        self.free.push(place);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(app: &str, appname: &str, id: &str) -> StreamKey {
        StreamKey {
            app: app.into(),
            appname: appname.into(),
            stream_id: id.into(),
        }
    }

    fn session(seq: &str, since: i64) -> Session {
        Session {
            sequence: seq.into(),
            area: Area::Overseas,
            since,
        }
    }

    #[test]
    fn an_entry_is_56_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 56);
    }

    #[test]
    fn streams_are_told_apart_by_app_appname_and_exact_id() {
        let mut live = Live::default();
        let long = "x".repeat(SHORT + 1);
        let streams = [
            key("a", "live", "cam"),
            key("a", "", "cam"),
            key("b", "live", "cam"),
            key("a", "live", "cam "),
            key("a", "live", ""),
            key("a", "live", &"x".repeat(SHORT)),
            key("a", "live", &long),
            key("a", "live", &"é".repeat(40)),
            key("a", "live", "cam\0"),
        ];
        for (i, s) in streams.iter().enumerate() {
            assert_eq!(live.set(s, Some(session(&i.to_string(), i as i64))), None);
        }
        assert_eq!(live.len(), streams.len());
        for (i, s) in streams.iter().enumerate() {
            assert_eq!(live.get(s), Some(session(&i.to_string(), i as i64)), "{s}");
        }
        assert_eq!(live.get(&key("a", "live", "ca")), None);
        assert_eq!(live.get(&key("c", "live", "cam")), None);
        assert_eq!(
            live.set(&streams[6], Some(session("new", 1))),
            Some(session("6", 6))
        );
        assert_eq!(live.set(&streams[6], None), Some(session("new", 1)));
        assert_eq!(live.set(&streams[6], None), None);
        assert_eq!(live.set(&key("zz", "live", "cam"), None), None);
        assert_eq!(live.len(), streams.len() - 1);
    }

    #[test]
    fn a_session_is_found_under_another_path_by_its_sequence() {
        let mut live = Live::default();
        live.set(&key("a", "live", "cam"), Some(session("1", 0)));
        live.set(&key("a", "other", "cam"), Some(session("2", 0)));
        live.set(&key("b", "live", "cam"), Some(session("3", 0)));
        live.set(&key("a", "live", "cam2"), Some(session("4", 0)));
        for (path, sequence, found) in [
            ("", "1", Some("live")),
            ("", "2", Some("other")),
            ("live", "2", Some("other")),
            // The stream's own path is not another one; other apps and ids are not looked at.
            ("live", "1", None),
            ("", "3", None),
            ("", "4", None),
            ("", "9", None),
        ] {
            let got = live.other_path(&key("a", path, "cam"), sequence);
            assert_eq!(
                got.as_ref().map(|(k, _)| &*k.appname),
                found,
                "{path:?} {sequence}"
            );
            if let Some((k, s)) = got {
                assert_eq!((&*k.app, &*k.stream_id), ("a", "cam"));
                assert_eq!(live.get(&k), Some(s));
            }
        }
        assert_eq!(live.other_path(&key("z", "", "cam"), "1"), None);
    }

    #[test]
    fn a_place_is_shared_and_remembered() {
        let mut live = Live::default();
        for i in 0..100 {
            live.set(
                &key(&format!("d{}", i % 3), "live", &i.to_string()),
                Some(session("1", 0)),
            );
        }
        assert_eq!(live.slots.len(), 3);
        // Lookups with strings of their own find the same places.
        for i in 0..100 {
            assert!(live
                .get(&key(&format!("d{}", i % 3), "live", &i.to_string()))
                .is_some());
        }
    }

    #[test]
    fn a_place_is_forgotten_with_its_last_stream() {
        let mut live = Live::default();
        let kept = key("d", "live", "kept");
        live.set(&kept, Some(session("1", 0)));
        for i in 0..1000 {
            let a = key("d", &format!("path{i}"), "a");
            let b = key("d", &format!("path{i}"), "b");
            live.set(&a, Some(session("2", 0)));
            live.set(&b, Some(session("3", 0)));
            // Replacing a live stream's session keeps its place.
            live.set(&b, Some(session("4", 0)));
            live.set(&a, None);
            assert_eq!(live.get(&b), Some(session("4", 0)));
            live.set(&b, None);
            // Ending what is not live changes nothing.
            assert_eq!(live.set(&b, None), None);
            assert_eq!(live.get(&b), None);
        }
        // A thousand paths came and went; two numbers served them all.
        assert_eq!(live.slots.len(), 2);
        assert_eq!(live.places.len(), 1);
        assert_eq!(live.places["d"].len(), 1);
        assert_eq!(live.get(&kept), Some(session("1", 0)));
        assert_eq!(live.len(), 1);
        // A forgotten place that comes back is a place again.
        let again = key("d", "path7", "c");
        live.set(&again, Some(session("5", 0)));
        assert_eq!(live.get(&again), Some(session("5", 0)));
        assert_eq!(live.get(&kept), Some(session("1", 0)));
        live.set(&kept, None);
        assert_eq!(live.get(&again), Some(session("5", 0)));
        assert_eq!(live.get(&kept), None);
    }

    #[test]
    fn shrinks_once_mostly_empty() {
        let mut live = Live::default();
        let streams: Vec<_> = (0..10_000).map(|i| key("a", "b", &i.to_string())).collect();
        for s in &streams {
            live.set(s, Some(session("1", 0)));
        }
        for s in &streams[10..] {
            live.set(s, None);
        }
        live.shrink();
        assert!(
            live.entries.capacity() < 4096,
            "{}",
            live.entries.capacity()
        );
        for s in &streams[..10] {
            assert!(live.get(s).is_some());
        }
    }
}

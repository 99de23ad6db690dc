//! The usage journal: batches the ledger could not hand to Redis, fsynced in the data
//! directory until Redis takes them.
//!
//! A frame is `len: u32 LE | batch id: 16 bytes | batch: len bytes | crc32 of id and batch`.
//! A frame cut short by a crash, or whose checksum does not match, ends the journal: it was
//! never acknowledged as written, so its records were still in the ledger's hands.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::StoreError;

/// A batch id and the batch.
pub(crate) type Frame = ([u8; 16], Vec<u8>);

/// An append-only file of usage batches.
#[derive(Debug)]
pub(crate) struct Journal {
    path: PathBuf,
    file: File,
    /// Bytes of whole frames in the file.
    len: u64,
}

fn io(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Journal {
    /// Opens (creating if needed) the journal at `path`, dropping a torn last frame.
    pub(crate) fn open(path: &Path) -> Result<Journal, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| io(path, e))?;
        let mut journal = Journal {
            path: path.to_owned(),
            file,
            len: 0,
        };
        let frames = journal.read_all()?;
        let whole: u64 = frames.iter().map(|(_, b)| frame_len(b)).sum();
        let on_disk = journal.file.metadata().map_err(|e| io(path, e))?.len();
        if whole != on_disk {
            tracing::warn!(path = %path.display(), dropped_bytes = on_disk - whole,
                "the usage journal ends in a torn frame; dropping it");
            journal.file.set_len(whole).map_err(|e| io(path, e))?;
            journal.file.sync_all().map_err(|e| io(path, e))?;
        }
        journal.len = whole;
        if !frames.is_empty() {
            tracing::info!(path = %path.display(), batches = frames.len(),
                "usage journal holds batches not yet in Redis");
        }
        Ok(journal)
    }

    /// Appends a frame to `<journal>.quarantine` (fsynced) and returns that file's path: for a
    /// batch whose checksum holds but that this build cannot read.
    pub(crate) fn quarantine(&self, id: &[u8; 16], batch: &[u8]) -> Result<PathBuf, StoreError> {
        let path = PathBuf::from(format!("{}.quarantine", self.path.display()));
        Journal::open(&path)?.append(id, batch)?;
        Ok(path)
    }

    /// Whether the journal holds nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a batch and waits until it is on disk.
    pub(crate) fn append(&mut self, id: &[u8; 16], batch: &[u8]) -> Result<(), StoreError> {
        let len = u32::try_from(batch.len())
            .map_err(|_| StoreError::Corrupt("a usage batch over 4 GiB".into()))?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(id);
        crc.update(batch);
        let mut frame = Vec::with_capacity(batch.len() + 24);
        frame.extend_from_slice(&len.to_le_bytes());
        frame.extend_from_slice(id);
        frame.extend_from_slice(batch);
        frame.extend_from_slice(&crc.finalize().to_le_bytes());
        self.file
            .write_all(&frame)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io(&self.path, e))?;
        self.len += frame.len() as u64;
        Ok(())
    }

    /// Every whole frame, oldest first.
    pub(crate) fn read_all(&mut self) -> Result<Vec<Frame>, StoreError> {
        let mut data = Vec::new();
        File::open(&self.path)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(|e| io(&self.path, e))?;
        let mut out = Vec::new();
        let mut rest = &data[..];
        while rest.len() >= 24 {
            let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            let Some(frame) = rest.get(..24 + len) else {
                break;
            };
            let id: [u8; 16] = frame[4..20].try_into().expect("16 bytes");
            let batch = &frame[20..20 + len];
            let stored = u32::from_le_bytes(frame[20 + len..].try_into().expect("4 bytes"));
            let mut crc = crc32fast::Hasher::new();
            crc.update(&id);
            crc.update(batch);
            if crc.finalize() != stored {
                break;
            }
            out.push((id, batch.to_vec()));
            rest = &rest[24 + len..];
        }
        Ok(out)
    }

    /// Empties the journal once Redis has every batch in it.
    pub(crate) fn clear(&mut self) -> Result<(), StoreError> {
        self.file
            .set_len(0)
            .and_then(|()| self.file.sync_all())
            .map_err(|e| io(&self.path, e))?;
        self.len = 0;
        Ok(())
    }
}

fn frame_len(batch: &[u8]) -> u64 {
    batch.len() as u64 + 24
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_a_reopen_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::open(&path).unwrap();
        assert!(j.is_empty());
        j.append(&[1; 16], b"first").unwrap();
        j.append(&[2; 16], b"second").unwrap();
        drop(j);
        // A crash in the middle of a third frame.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[9, 0, 0, 0, 3, 3]).unwrap();
        drop(f);
        let mut j = Journal::open(&path).unwrap();
        let frames = j.read_all().unwrap();
        assert_eq!(
            frames,
            vec![([1; 16], b"first".to_vec()), ([2; 16], b"second".to_vec())]
        );
        j.append(&[3; 16], b"third").unwrap();
        assert_eq!(j.read_all().unwrap().len(), 3);
        j.clear().unwrap();
        assert!(j.is_empty());
        assert!(Journal::open(&path).unwrap().read_all().unwrap().is_empty());
    }

    #[test]
    fn a_frame_with_a_bad_checksum_ends_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::open(&path).unwrap();
        j.append(&[1; 16], b"good").unwrap();
        j.append(&[2; 16], b"flipped").unwrap();
        drop(j);
        let mut data = std::fs::read(&path).unwrap();
        let last = data.len() - 6;
        data[last] ^= 0xff;
        std::fs::write(&path, data).unwrap();
        let mut j = Journal::open(&path).unwrap();
        assert_eq!(j.read_all().unwrap(), vec![([1; 16], b"good".to_vec())]);
    }
}

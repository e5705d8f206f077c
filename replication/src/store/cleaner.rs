//! The log cleaner: the oldest sealed segment's live records copied
//! forward through the writer, then the segment removed.

use tracing::info;

use super::queries::for_each_mailbox_chunk;
use super::*;
use crate::BodyHash;
use crate::record::{DeleteRecord, EntryRecord};

impl FragmentStore {
    /// One step of the log cleaner: if the oldest sealed segment is worth
    /// cleaning, copies its live records forward (through the writer, so
    /// deliveries go on meanwhile) and removes it. Returns what it did.
    pub async fn compact_once(&self) -> Result<Option<CompactReport>, StoreError> {
        let (seg, file, plan) = {
            let index = self.shared.index();
            if index.segments.len() < 2 {
                return Ok(None);
            }
            let (&seg, oldest) = index.segments.first_key_value().expect("non-empty");
            let total_disk: u64 = index.segments.values().map(|s| s.len).sum();
            let total_live: u64 = index.segments.values().map(|s| s.live_bytes).sum();
            let ratio = |live: u64, len: u64| if len == 0 { 0.0 } else { live as f64 / len as f64 };
            let worth = ratio(oldest.live_bytes, oldest.len) < CLEAN_LIVE_RATIO_MAX
                || ratio(total_live, total_disk) < CLEAN_LIVE_RATIO_MAX;
            if !worth {
                return Ok(None);
            }
            let mut plan: Vec<(u64, u64, Option<BodyHash>)> = Vec::new();
            for (hash, b) in &index.bodies {
                if b.seg == seg {
                    plan.push((b.body_offset, b.body_len, Some(*hash)));
                }
            }
            (seg, oldest.file.clone(), plan)
        };
        // The segment's entries and tombstones, found a chunk of mailboxes
        // at a time on a blocking thread (a walk of the whole index).
        let shared = self.shared.clone();
        let (entries, tombs) = tokio::task::spawn_blocking(move || segment_records(&shared, seg))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
        let plan = (plan, entries, tombs);
        let freed_bytes = self.shared.index().segments.get(&seg).map_or(0, |s| s.len);
        let (bodies, entries, tombs) = plan;
        let items = tokio::task::spawn_blocking(move || -> Result<Vec<Relocation>, StoreError> {
            let mut items = Vec::with_capacity(bodies.len() + entries.len());
            for (offset, len, hash) in bodies {
                let hash = hash.expect("body plan has a hash");
                match read_checked(&file, offset, len, hash) {
                    Ok(bytes) => items.push(Relocation::Body { hash, bytes }),
                    Err(StoreError::Corrupt(_)) => items.push(Relocation::Lost { hash }),
                    Err(e) => return Err(e),
                }
            }
            items.extend(entries.into_iter().map(Relocation::Entry));
            items.extend(tombs.into_iter().map(Relocation::Tomb));
            Ok(items)
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
        let copied_records = self.submit(|reply| Op::Relocate { seg, items, reply }).await?;
        if !self.submit(|reply| Op::DropSegment { seg, reply }).await? {
            // Something in it came alive again meanwhile (a delivery of an
            // identical body); the next round will copy it.
            return Ok(None);
        }
        info!(segment = seg, copied_records, freed_bytes, "segment cleaned");
        Ok(Some(CompactReport {
            segment: seg,
            copied_records,
            freed_bytes,
        }))
    }
}

/// The live entries and the tombstones that segment `seg` holds.
fn segment_records(shared: &Shared, seg: u32) -> (Vec<EntryRecord>, Vec<DeleteRecord>) {
    let (mut entries, mut tombs) = (Vec::new(), Vec::new());
    for_each_mailbox_chunk(shared, |index, users| {
        for user in users {
            let Some(m) = index.mailboxes.get(user) else { continue };
            entries.extend(
                m.entries
                    .values()
                    .filter(|e| e.loc.seg == seg)
                    .map(|e| record_of(user, &e.meta)),
            );
            tombs.extend(
                m.tombstones
                    .iter()
                    .filter(|(_, t)| t.loc.seg == seg)
                    .map(|(id, t)| DeleteRecord {
                        user: user.clone(),
                        id: *id,
                        hlc: t.hlc,
                        replicas: t.replicas.clone(),
                        moved: t.moved.clone(),
                    }),
            );
        }
    });
    (entries, tombs)
}

//! Entry points for the fuzz targets in `fuzz/` and the test that replays
//! their corpus: bytes as a disk may hand them back (torn, flipped,
//! garbage). Must never panic; recovery must open whatever it is given (cutting
//! or skipping what is bad) and what it then serves must read back
//! checked. Not an API.

use std::sync::atomic::{AtomicU64, Ordering};

/// The record scanner over arbitrary segment bytes: every record it
/// reports lies inside the data and the scan ends.
pub fn records(data: &[u8]) {
    let mut end = 0u64;
    crate::record::scan(data, |pos, len, _| {
        assert!(
            pos >= end && pos + len <= data.len() as u64,
            "a record outside the data or overlapping"
        );
        end = pos + len;
    });
}

/// Recovery: a store directory whose only segment is `data` opens (or is
/// refused with an error), every listed entry's body reads back checked or
/// fails cleanly, and the store takes a new write.
pub fn recovery(data: &[u8]) {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "quill-fuzz-recovery-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("seg-00000001.qseg"), data).expect("segment");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    if let Ok(store) = crate::FragmentStore::open(crate::StoreConfig::new(&dir)) {
        rt.block_on(async {
            for u in store.usage() {
                for e in store.list(&u.user) {
                    let _ = store.read_body(e.body).await;
                }
            }
            let d = crate::Delivery {
                id: store.new_message_id(1),
                arrival_ms: 1,
                users: vec!["fuzz@example.org".into()],
                folder: "INBOX".into(),
                body: b"after recovery\r\n".to_vec(),
                replicas: vec![],
            };
            let _ = store.deliver(d).await;
        });
        store.close();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

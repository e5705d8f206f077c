//! openraft's storage suite against the on-disk log and state machine.

mod common;

use membership::store::{LogStore, StateMachineStore};
use membership::types::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};

use common::TestDir;

struct OnDisk;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TestDir> for OnDisk {
    async fn build(&self) -> Result<(TestDir, LogStore, StateMachineStore), StorageError> {
        let dir = TestDir::new("suite");
        let log = LogStore::open(dir.path()).expect("open log");
        let sm = StateMachineStore::open(dir.path()).expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    // The suite makes its own tokio runtimes.
    Suite::test_all(OnDisk).expect("storage suite");
}

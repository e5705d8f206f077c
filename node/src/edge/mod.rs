//! Checks of mail arriving from the internet on `--smtp` (never on
//! submission or LMTP, never from `--trusted-networks`): who may send as
//! whom ([`verify`]: SPF, DKIM, DMARC, ARC, iprev, and the policy that
//! acts on them).

pub mod cache;
pub mod verify;

pub use verify::{AuthPolicy, Edge, EdgeConfig};

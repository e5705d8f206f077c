#![no_main]
//! The cluster wire's frames with the payloads membership and replication
//! own (the node's `ClusterRequest`/`ClusterReply`).
type Request = quill_proto::wire::ClusterRequest<membership::RaftMessage, replication::replica::Call>;
type Reply = quill_proto::wire::ClusterReply<membership::RaftReply, replication::replica::Answer>;
libfuzzer_sys::fuzz_target!(|data: &[u8]| quill_proto::fuzz::cluster_frame::<Request, Reply>(data));

//! The checks' own cache of parsed DNS answers (SPF, DKIM keys, DMARC
//! records, PTR and addresses), as `mail-auth` asks for it: an answer is
//! looked up and parsed once per TTL, not once per message. Bounded: a
//! full table drops what expired, then everything if that is not enough.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Instant;

use mail_auth::{MX, RecordSet, ResolverCache, Txt};

/// Answers kept per kind, at most.
pub const ENTRIES_MAX: usize = 16 * 1024;

/// One kind of answer: name -> (answer, valid until).
pub struct TtlCache<K, V>(Mutex<HashMap<K, (V, Instant)>>);

impl<K, V> Default for TtlCache<K, V> {
    fn default() -> Self {
        TtlCache(Mutex::new(HashMap::new()))
    }
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for TtlCache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(name)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(v, _)| v.clone())
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(name).map(|(v, _)| v)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= ENTRIES_MAX {
            let now = Instant::now();
            map.retain(|_, (_, until)| *until > now);
            if map.len() >= ENTRIES_MAX {
                map.clear();
            }
        }
        map.insert(key, (value, valid_until));
    }
}

/// Every kind `mail-auth` looks up.
#[derive(Default)]
pub struct Caches {
    pub txt: TtlCache<Box<str>, Txt>,
    pub mx: TtlCache<Box<str>, RecordSet<MX>>,
    pub ipv4: TtlCache<Box<str>, RecordSet<Ipv4Addr>>,
    pub ipv6: TtlCache<Box<str>, RecordSet<Ipv6Addr>>,
    pub ptr: TtlCache<IpAddr, RecordSet<Box<str>>>,
}

/// `mail_auth::Parameters` over `params` with every cache of `c`.
pub type Params<'x, P> = mail_auth::Parameters<
    'x,
    P,
    TtlCache<Box<str>, Txt>,
    TtlCache<Box<str>, RecordSet<MX>>,
    TtlCache<Box<str>, RecordSet<Ipv4Addr>>,
    TtlCache<Box<str>, RecordSet<Ipv6Addr>>,
    TtlCache<IpAddr, RecordSet<Box<str>>>,
>;

impl Caches {
    pub fn params<P>(&self, params: P) -> Params<'_, P> {
        mail_auth::Parameters::new(params)
            .with_txt_cache(&self.txt)
            .with_mx_cache(&self.mx)
            .with_ipv4_cache(&self.ipv4)
            .with_ipv6_cache(&self.ipv6)
            .with_ptr_cache(&self.ptr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn answers_expire_and_the_table_stays_bounded() {
        let c: TtlCache<Box<str>, u32> = TtlCache::default();
        let later = Instant::now() + Duration::from_secs(60);
        c.insert("a.test".into(), 1, later);
        c.insert("gone.test".into(), 2, Instant::now());
        assert_eq!(c.get("a.test"), Some(1));
        assert_eq!(c.get("gone.test"), None, "expired");
        for i in 0..ENTRIES_MAX * 2 {
            c.insert(format!("{i}.test").into(), 3, later);
        }
        assert!(c.0.lock().unwrap().len() <= ENTRIES_MAX);
    }
}

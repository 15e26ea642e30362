//! Where a new chunk's replicas go: pure, deterministic, unit-tested.

/// Picks `copies` distinct servers for chunk `chunk_id`, spreading chunks evenly: the sorted
/// server list rotated by the chunk id. Fewer servers than `copies` gives all of them.
pub fn place_replicas(servers: &[String], copies: usize, chunk_id: u64) -> Vec<String> {
    let mut sorted: Vec<String> = servers.to_vec();
    sorted.sort();
    sorted.dedup();
    if sorted.is_empty() {
        return vec![];
    }
    let start = (chunk_id % sorted.len() as u64) as usize;
    sorted.iter().cycle().skip(start).take(copies.min(sorted.len())).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("s{i}")).collect()
    }

    #[test]
    fn replicas_are_distinct_and_spread() {
        let s = servers(5);
        for id in 0..20 {
            let mut placed = place_replicas(&s, 3, id);
            assert_eq!(placed.len(), 3);
            placed.sort();
            placed.dedup();
            assert_eq!(placed.len(), 3);
        }
        assert_ne!(place_replicas(&s, 3, 0), place_replicas(&s, 3, 1));
    }

    #[test]
    fn too_few_servers_gives_all_of_them() {
        assert_eq!(place_replicas(&servers(2), 3, 7).len(), 2);
        assert!(place_replicas(&[], 3, 7).is_empty());
    }
}

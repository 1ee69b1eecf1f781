//! Where a trial goes: the free slots of a pool's nodes, indexed so that one
//! placement costs O(log n) on one node and O(k log k) across k partly free nodes.
//!
//! The order of preference, for a trial of `s` slots:
//! 1. owned nodes (not `burst`): one node that fits `s` (a holder of the trial's
//!    checkpoint, else a node on a holder's site, else best fit: the node with the
//!    fewest free slots that fits, ties to the lowest id); then a gang across the
//!    fewest owned nodes;
//! 2. only for a trial that may burst (it waited long enough, or owned capacity
//!    can never fit it): burst nodes, cheapest first, the same way;
//! 3. a gang across owned and burst nodes together.
//!
//! A gang is all or nothing: a layout always sums to exactly `s` slots, and no
//! node gives more than it has free.

use std::collections::{BTreeMap, BTreeSet};

use crate::{Layout, Node, NodeId, Task};

/// A class of capacity: `(burst, cost)`; owned before burst, cheaper first.
type Tier = (bool, u64);

#[derive(Debug, Clone)]
struct Free {
    free: u32,
    tier: Tier,
    site: usize,
    /// Takes no new work: its free slots stay 0.
    closed: bool,
}

/// The free slots of one pool's nodes.
#[derive(Debug, Clone, Default)]
pub struct Placer {
    nodes: BTreeMap<NodeId, Free>,
    /// `(free, node)` per tier: best fit is the first entry at or above `s`.
    by_tier: BTreeMap<Tier, BTreeSet<(u32, NodeId)>>,
    /// The same per tier and site (locality).
    by_site: BTreeMap<(Tier, usize), BTreeSet<(u32, NodeId)>>,
    /// Free slots per tier (a gang that cannot fit fails at once).
    free_by_tier: BTreeMap<Tier, u64>,
    sites: Vec<String>,
    capacity: u32,
    owned: u32,
    /// The smallest gang that failed to fit since slots were last given back,
    /// without and with burst capacity: free slots only shrink until then, so
    /// any gang at least as large fails too (a full cluster answers at once).
    failed_min: [u32; 2],
}

impl Placer {
    /// The free slots of `nodes` once the `running` layouts are subtracted.
    ///
    /// Runs once per scheduling pass, so the indexes are bulk-built from sorted
    /// vectors (linear) rather than by one insertion per node.
    pub fn new<'a>(nodes: &[Node], running: impl IntoIterator<Item = &'a Layout>) -> Self {
        let mut p = Placer {
            failed_min: [u32::MAX; 2],
            ..Placer::default()
        };
        let mut free: Vec<(NodeId, Free)> = Vec::with_capacity(nodes.len());
        for n in nodes {
            let site = match p.sites.iter().position(|s| *s == n.site) {
                Some(i) => i,
                None => {
                    p.sites.push(n.site.clone());
                    p.sites.len() - 1
                }
            };
            let tier = (n.burst, n.cost_per_slot_hour_micros);
            p.capacity = p.capacity.saturating_add(n.slots);
            if !n.burst {
                p.owned = p.owned.saturating_add(n.slots);
            }
            free.push((
                n.id,
                Free {
                    free: n.slots,
                    tier,
                    site,
                    closed: n.closed,
                },
            ));
        }
        free.sort_by_key(|(id, _)| *id);
        free.dedup_by_key(|(id, _)| *id);
        // Subtract the running work first, then index once (cheaper than moving
        // every node through the indexes once per running trial).
        for layout in running {
            for (n, s) in layout {
                if let Ok(i) = free.binary_search_by_key(n, |(id, _)| *id) {
                    free[i].1.free = free[i].1.free.saturating_sub(*s);
                }
            }
        }
        // A closed node's capacity is what its running trials hold.
        for (_, f) in free.iter_mut().filter(|(_, f)| f.closed) {
            p.capacity = p.capacity.saturating_sub(f.free);
            if !f.tier.0 {
                p.owned = p.owned.saturating_sub(f.free);
            }
            f.free = 0;
        }
        let mut by_tier: Vec<(Tier, u32, NodeId)> = Vec::with_capacity(free.len());
        let mut by_site: Vec<((Tier, usize), u32, NodeId)> = Vec::with_capacity(free.len());
        for (id, f) in &free {
            by_tier.push((f.tier, f.free, *id));
            by_site.push(((f.tier, f.site), f.free, *id));
            *p.free_by_tier.entry(f.tier).or_default() += u64::from(f.free);
        }
        p.by_tier = group_sorted(by_tier);
        p.by_site = group_sorted(by_site);
        p.nodes = free.into_iter().collect();
        p
    }

    /// Total slots of the pool.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Free slots of `node` (0 for an unknown node).
    pub fn free(&self, node: NodeId) -> u32 {
        self.nodes.get(&node).map_or(0, |f| f.free)
    }

    /// Finds a layout for `task` and reserves its slots.
    pub fn place(&mut self, task: &Task) -> Option<Layout> {
        let burst = usize::from(self.may_burst(task));
        if task.slots >= self.failed_min[burst] {
            return None;
        }
        let Some(layout) = self.find(task) else {
            self.failed_min[burst] = self.failed_min[burst].min(task.slots);
            return None;
        };
        self.take(&layout);
        Some(layout)
    }

    /// Burst capacity only for a trial that waited long enough, or that owned
    /// capacity can never fit.
    fn may_burst(&self, task: &Task) -> bool {
        task.may_burst || task.slots > self.owned
    }

    /// Reserves the slots of `layout` (unknown nodes are ignored).
    pub fn take(&mut self, layout: &Layout) {
        for (n, s) in layout {
            self.adjust(*n, -i64::from(*s));
        }
    }

    /// Frees the slots of `layout` (a released trial's).
    pub fn give_back(&mut self, layout: &Layout) {
        for (n, s) in layout {
            self.adjust(*n, i64::from(*s));
        }
        self.failed_min = [u32::MAX; 2];
    }

    /// Where `task` would go now, without reserving anything.
    pub fn find(&self, task: &Task) -> Option<Layout> {
        let s = task.slots;
        if s == 0 || s > self.capacity {
            return None;
        }
        let may_burst = self.may_burst(task);
        let owned: Vec<Tier> = self.tiers(false);
        for tier in &owned {
            if let Some(n) = self.fit_one(*tier, task) {
                return Some(vec![(n, s)]);
            }
        }
        if let Some(l) = self.fit_many(&owned, s) {
            return Some(l);
        }
        if !may_burst {
            return None;
        }
        let burst = self.tiers(true);
        for tier in &burst {
            if let Some(n) = self.fit_one(*tier, task) {
                return Some(vec![(n, s)]);
            }
            if let Some(l) = self.fit_many(&[*tier], s) {
                return Some(l);
            }
        }
        let all: Vec<Tier> = owned.into_iter().chain(burst).collect();
        self.fit_many(&all, s)
    }

    fn tiers(&self, burst: bool) -> Vec<Tier> {
        self.by_tier
            .keys()
            .filter(|t| t.0 == burst)
            .copied()
            .collect()
    }

    /// One node of `tier` that fits all of `task`: a checkpoint holder, else a node
    /// on a holder's site, else the best fit.
    fn fit_one(&self, tier: Tier, task: &Task) -> Option<NodeId> {
        let s = task.slots;
        let holder = task
            .holders
            .iter()
            .filter_map(|h| self.nodes.get(h).map(|f| (h, f)))
            .filter(|(_, f)| f.tier == tier && f.free >= s)
            .min_by_key(|(h, f)| (f.free, **h))
            .map(|(h, _)| *h);
        if holder.is_some() {
            return holder;
        }
        let mut holder_sites: Vec<usize> = task
            .holders
            .iter()
            .filter_map(|h| self.nodes.get(h).map(|f| f.site))
            .collect();
        holder_sites.sort_unstable();
        holder_sites.dedup();
        let near = holder_sites
            .iter()
            .filter_map(|site| self.by_site.get(&(tier, *site)))
            .filter_map(|set| set.range((s, 0)..).next())
            .min()
            .map(|(_, n)| *n);
        if near.is_some() {
            return near;
        }
        self.by_tier
            .get(&tier)?
            .range((s, 0)..)
            .next()
            .map(|(_, n)| *n)
    }

    /// A gang of `s` slots across the fewest nodes of `tiers`: the largest free
    /// nodes first, and for the last piece the smallest node that fits it.
    fn fit_many(&self, tiers: &[Tier], s: u32) -> Option<Layout> {
        let free: u64 = tiers.iter().filter_map(|t| self.free_by_tier.get(t)).sum();
        if free < u64::from(s) {
            return None;
        }
        let mut candidates: Vec<(u32, NodeId)> = Vec::new();
        for t in tiers {
            if let Some(set) = self.by_tier.get(t) {
                candidates.extend(set.iter().rev().take_while(|(f, _)| *f > 0));
            }
        }
        // Largest first; ties to the lowest id.
        candidates.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut layout = Vec::new();
        let mut need = s;
        for (i, (f, n)) in candidates.iter().enumerate() {
            if *f >= need {
                // The last piece: the smallest remaining node that fits it.
                let last = candidates[i..]
                    .iter()
                    .filter(|(f, _)| *f >= need)
                    .min()
                    .map_or(*n, |(_, n)| *n);
                layout.push((last, need));
                return Some(layout);
            }
            layout.push((*n, *f));
            need -= f;
        }
        None
    }

    fn adjust(&mut self, node: NodeId, delta: i64) {
        let Some(f) = self.nodes.get_mut(&node) else {
            return;
        };
        if f.closed {
            return; // Slots given back on a closed node stay unused.
        }
        let old = f.free;
        let new = (i64::from(old) + delta).clamp(0, i64::from(u32::MAX)) as u32;
        f.free = new;
        let (tier, site) = (f.tier, f.site);
        if let Some(set) = self.by_tier.get_mut(&tier) {
            set.remove(&(old, node));
            set.insert((new, node));
        }
        if let Some(set) = self.by_site.get_mut(&(tier, site)) {
            set.remove(&(old, node));
            set.insert((new, node));
        }
        if let Some(total) = self.free_by_tier.get_mut(&tier) {
            *total = *total - u64::from(old) + u64::from(new);
        }
    }
}

/// `(key, free, node)` entries grouped into one ordered set per key.
fn group_sorted<K: Ord + Copy>(
    mut entries: Vec<(K, u32, NodeId)>,
) -> BTreeMap<K, BTreeSet<(u32, NodeId)>> {
    entries.sort_unstable();
    let mut groups = BTreeMap::new();
    let mut rest = entries.as_slice();
    while let Some((key, _, _)) = rest.first() {
        let end = rest.partition_point(|(k, _, _)| k == key);
        let set: BTreeSet<(u32, NodeId)> = rest[..end].iter().map(|(_, f, n)| (*f, *n)).collect();
        groups.insert(*key, set);
        rest = &rest[end..];
    }
    groups
}

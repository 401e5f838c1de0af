//! Sides the join gave up on, remembered so that their partner, should it still come, is
//! recognised as late (counted apart from one-sided requests and evictions) instead of waiting a
//! whole window for a partner that is gone and being counted one-sided a second time.
//!
//! Bounded: at most `capacity` keys are remembered, oldest forgotten first; a partner arriving
//! after its key was forgotten waits and is evicted one-sided like any other.

use std::collections::{HashMap, VecDeque};

/// Given-up sides of one key, per role.
#[derive(Default)]
struct Given {
    agent: u32,
    persona: u32,
}

impl Given {
    fn of(&mut self, agent_side: bool) -> &mut u32 {
        if agent_side {
            &mut self.agent
        } else {
            &mut self.persona
        }
    }
}

pub struct GivenUp<K> {
    /// Per key: the generation of its entry in `order`, and its sides.
    keys: HashMap<K, (u64, Given)>,
    /// Keys in the order they were first given up on, for forgetting; an entry whose generation
    /// no longer matches the key's (accounted for since) is skipped. Never longer than
    /// `capacity`.
    order: VecDeque<(K, u64)>,
    generation: u64,
    capacity: usize,
}

impl<K: std::hash::Hash + Eq + Copy> GivenUp<K> {
    pub fn new(capacity: usize) -> Self {
        Self {
            keys: HashMap::new(),
            order: VecDeque::new(),
            generation: 0,
            capacity: capacity.max(1),
        }
    }

    /// The join gave up on a side of `key` (the agent's when `agent_side`).
    pub fn remember(&mut self, key: K, agent_side: bool) {
        let (_, given) = self.keys.entry(key).or_insert_with(|| {
            self.generation += 1;
            self.order.push_back((key, self.generation));
            (self.generation, Given::default())
        });
        *given.of(agent_side) += 1;
        while self.order.len() > self.capacity {
            if let Some((oldest, generation)) = self.order.pop_front()
                && self
                    .keys
                    .get(&oldest)
                    .is_some_and(|(g, _)| *g == generation)
            {
                self.keys.remove(&oldest);
            }
        }
    }

    /// Whether a side of `key` (the agent's when `agent_side`) arrives for a partner that was
    /// given up on; if so, that partner is accounted for.
    pub fn take_partner(&mut self, key: &K, agent_side: bool) -> bool {
        let Some((_, given)) = self.keys.get_mut(key) else {
            return false;
        };
        let partners = given.of(!agent_side);
        if *partners == 0 {
            return false;
        }
        *partners -= 1;
        if given.agent == 0 && given.persona == 0 {
            // Its entry in `order` goes when it reaches the front.
            self.keys.remove(key);
        }
        true
    }

    /// Keys remembered now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::GivenUp;

    #[test]
    fn a_partner_of_a_given_up_side_is_late_once() {
        let mut given_up = GivenUp::new(8);
        given_up.remember(1, true);
        assert!(!given_up.take_partner(&1, true), "same role: not a partner");
        assert!(given_up.take_partner(&1, false));
        assert!(!given_up.take_partner(&1, false), "accounted for once");
        assert_eq!(given_up.len(), 0);
    }

    #[test]
    fn the_oldest_keys_are_forgotten_beyond_capacity() {
        let mut given_up = GivenUp::new(2);
        for key in 1..=3 {
            given_up.remember(key, false);
        }
        assert_eq!(given_up.len(), 2);
        assert!(!given_up.take_partner(&1, true));
        assert!(given_up.take_partner(&3, true));
    }
}

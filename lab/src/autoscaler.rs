//! The HPA's rule, played every sync period on the replicas' average memory.

use crate::k8s::Hpa;

/// The HPA's decision, as in the Kubernetes controller: a recommendation from the ratio
/// of the average utilisation to the target, left alone within 10% of 1 (the
/// controller's default `--horizontal-pod-autoscaler-tolerance` 0.1, which k3s keeps: the
/// lab copies the cluster's rule, it does not choose one), stabilised over a window
/// (the highest recommendation of the window when scaling down, the lowest when up),
/// then limited by the policies over their periods. Times are already time-scaled.
#[derive(Debug, Default)]
pub struct Autoscaler {
    recs: Vec<(f64, u32)>,
    /// (time, replicas after the change, change)
    changes: Vec<(f64, u32, i64)>,
}

impl Autoscaler {
    pub fn decide(&mut self, h: &Hpa, scale: f64, t: f64, current: u32, util_pct: f64) -> u32 {
        let ratio = util_pct / h.target_pct;
        let rec = if (ratio - 1.0).abs() <= 0.1 {
            current
        } else {
            (current as f64 * ratio).ceil() as u32
        }
        .clamp(h.min, h.max);
        // As if the HPA had been running at the current count before the lab started:
        // no scale-down before one whole window has passed.
        if self.recs.is_empty() {
            self.recs.push((t, current));
        }
        self.recs.push((t, rec));
        let keep = h.down.window_s.max(h.up.window_s) / scale + 1.0;
        self.recs.retain(|(rt, _)| t - rt <= keep);
        let window = |w: f64| self.recs.iter().filter(move |(rt, _)| t - rt <= w / scale);
        let up_rec = if h.up.window_s > 0.0 {
            window(h.up.window_s).map(|x| x.1).min().unwrap_or(rec)
        } else {
            rec
        };
        let down_rec = window(h.down.window_s).map(|x| x.1).max().unwrap_or(rec);
        let changed_since = |period: f64, up: bool| -> i64 {
            self.changes
                .iter()
                .filter(|(ct, _, d)| t - ct < period / scale && (*d > 0) == up)
                .map(|x| x.2)
                .sum()
        };
        let mut next = current;
        if up_rec > current {
            let limits = h.up.policies.iter().map(|p| {
                let start = current as i64 - changed_since(p.period_s, true);
                let start = start.max(0) as f64;
                if p.pods {
                    (start + p.value) as u32
                } else {
                    (start * (1.0 + p.value / 100.0)).ceil() as u32
                }
            });
            let limit = if h.up.select_max {
                limits.max()
            } else {
                limits.min()
            };
            next = up_rec.min(limit.unwrap_or(h.max)).min(h.max).max(current);
        } else if down_rec < current {
            let limits = h.down.policies.iter().map(|p| {
                let start = current as i64 - changed_since(p.period_s, false);
                let start = start as f64;
                let floor = if p.pods {
                    start - p.value
                } else {
                    (start * (1.0 - p.value / 100.0)).floor()
                };
                floor.max(0.0) as u32
            });
            // selectPolicy Min picks the policy that removes the fewest pods.
            let limit = if h.down.select_max {
                limits.min()
            } else {
                limits.max()
            };
            next = down_rec.max(limit.unwrap_or(h.min)).max(h.min).min(current);
        }
        if next != current {
            self.changes.push((t, next, next as i64 - current as i64));
        }
        next
    }
}

/// The highest average memory utilisation (% of the request) that the replicas held
/// through a whole scale-up window at the minimum count, before `until` (the first
/// scaling decision: after it a new replica may still be starting while the ready count
/// is the minimum): what the HPA's target must be below, by the controller's 10%
/// tolerance (its default `--horizontal-pod-autoscaler-tolerance` 0.1, which `decide`
/// plays), for the run to scale up. `evals` are the autoscaler's readings, (time, ready replicas,
/// utilisation); a reading at another count (a replica killed) belongs to no window.
/// `window_s` is already time-scaled.
pub fn held_at_minimum(
    evals: &[(f64, u32, f64)],
    min: u32,
    window_s: f64,
    until: f64,
) -> Option<f64> {
    let at_min: Vec<(f64, f64)> = evals
        .iter()
        .filter(|e| e.0 < until && e.1 == min)
        .map(|e| (e.0, e.2))
        .collect();
    let first = at_min.first()?.0;
    at_min
        .iter()
        .filter(|(t, _)| t - first >= window_s)
        .map(|(t, _)| {
            at_min
                .iter()
                .filter(|(rt, _)| rt <= t && t - rt <= window_s)
                .map(|x| x.1)
                .fold(f64::INFINITY, f64::min)
        })
        .reduce(f64::max)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn hpa() -> Hpa {
        Hpa::parse(
            "spec:
  minReplicas: 2
  maxReplicas: 6
  metrics:
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: 70
  behavior:
    scaleUp:
      stabilizationWindowSeconds: 0
      selectPolicy: Max
      policies:
        - type: Percent
          value: 100
          periodSeconds: 15
        - type: Pods
          value: 2
          periodSeconds: 15
    scaleDown:
      selectPolicy: Min
      policies:
        - type: Pods
          value: 1
          periodSeconds: 60
",
            "spec:
  strategy:
    rollingUpdate:
      maxSurge: 1
  template:
    spec:
      containers:
        - name: sluice
          resources:
            requests:
              memory: 192Mi
",
        )
        .unwrap()
    }

    #[test]
    fn scales_up_fast_and_down_slowly() {
        let h = hpa();
        assert_eq!(h.up.policies.len(), 2);
        assert_eq!(h.down.window_s, 300.0);
        let mut s = Autoscaler::default();
        // 2 pods at 3x the target want 6; the policies allow max(2 x 2, 2 + 2) = 4.
        assert_eq!(s.decide(&h, 1.0, 0.0, 2, 210.0), 4);
        // Within the same 15 s period no more; after it, the rest.
        assert_eq!(s.decide(&h, 1.0, 5.0, 4, 210.0), 4);
        assert_eq!(s.decide(&h, 1.0, 20.0, 4, 210.0), 6);
        // Load gone: nothing for the 300 s window, then one pod a minute.
        assert_eq!(s.decide(&h, 1.0, 100.0, 6, 5.0), 6);
        assert_eq!(s.decide(&h, 1.0, 330.0, 6, 5.0), 5);
        assert_eq!(s.decide(&h, 1.0, 350.0, 5, 5.0), 5);
        assert_eq!(s.decide(&h, 1.0, 395.0, 5, 5.0), 4);
        // Inside the 10% tolerance nothing moves.
        let mut s = Autoscaler::default();
        assert_eq!(s.decide(&h, 1.0, 0.0, 3, 75.0), 3);
        // Time-scaled by 10: the 300 s window is 30 s.
        let mut s = Autoscaler::default();
        assert_eq!(s.decide(&h, 10.0, 0.0, 4, 5.0), 4);
        assert_eq!(s.decide(&h, 10.0, 31.0, 4, 5.0), 3);
    }

    /// The HPA's decisions every sync period (15 s) at a steady utilisation, from `pods`.
    fn settle(h: &Hpa, pods: u32, util_pct: f64, seconds: f64) -> u32 {
        let mut s = Autoscaler::default();
        let mut n = pods;
        let mut t = 0.0;
        while t <= seconds {
            n = s.decide(h, 1.0, t, n, util_pct);
            t += 15.0;
        }
        n
    }

    /// k8s/app/hpa.yaml's target against the two loads docs/deploy.md derives it from:
    /// the pods must scale up at what the lab's weakest default run held at 2 pods
    /// (docs/sizing.json's hold_mib), and an idle cluster, each pod holding the most the
    /// lab's replicas held once a load was over (idle_mib), must come back to the
    /// minimum.
    #[test]
    fn the_manifests_target_scales_up_at_the_labs_load_and_back_to_the_minimum_idle() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let h = Hpa::load(&root).unwrap();
        let sizing: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/sizing.json")).unwrap();
        let hold = sizing["sluice"]["hold_mib"].as_f64().unwrap();
        let pct = |mib: f64| 100.0 * mib / h.memory_request_mib;
        // One whole scale-up window plus a sync period to see it.
        let up = settle(&h, h.min, pct(hold), h.up.window_s + 15.0);
        assert!(
            up > h.min,
            "{hold} MiB is {:.0}% of the request: target {}% must scale it up",
            pct(hold),
            h.target_pct
        );
        let idle = sizing["sluice"]["idle_mib"].as_f64().unwrap();
        for pods in h.min..=h.max {
            assert_eq!(
                settle(&h, pods, pct(idle), 1800.0),
                h.min,
                "from {pods} pods idle ({:.0}%) with target {}%",
                pct(idle),
                h.target_pct
            );
        }
    }

    #[test]
    fn held_at_minimum_is_the_best_whole_window_before_the_first_change() {
        let evals = [
            (0.0, 2, 50.0),
            (1.5, 2, 80.0),
            (3.0, 2, 75.0),
            (4.5, 2, 70.0),
            (6.0, 2, 40.0),
            (7.5, 2, 95.0),
            (9.0, 3, 90.0),
        ];
        // Windows of 3 s ending at 3.0 (50, 80, 75), 4.5 (80, 75, 70) and 6.0 (75, 70,
        // 40); the scaling decision came at 7.0, so the reading at 7.5 (the new replica
        // starting, the ready count still 2) is left out, as is the one at 3 replicas.
        assert_eq!(held_at_minimum(&evals, 2, 3.0, 7.0), Some(70.0));
        // No whole window before the decision.
        assert_eq!(held_at_minimum(&evals, 2, 10.0, 7.0), None);
        // A reading at another count (a killed replica) is in no window.
        let killed = [(0.0, 2, 80.0), (1.5, 1, 10.0), (3.0, 2, 80.0)];
        assert_eq!(held_at_minimum(&killed, 2, 3.0, f64::INFINITY), Some(80.0));
    }
}

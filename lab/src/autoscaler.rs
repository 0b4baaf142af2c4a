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

#[cfg(test)]
mod tests {
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
}

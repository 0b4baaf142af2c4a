// The load test of ASSESSMENT.md: closed-loop virtual users, each calling
// GET /api/data with no think time, ramped to 10,000.
//
//   k6 run stress-test/stress-test.js                          the full 13-minute profile
//   k6 run -e PROFILE=smoke stress-test/stress-test.js         100 VUs for 30 s
//   k6 run -e PROFILE=lab stress-test/stress-test.js           the full shape in ~3 minutes
//   k6 run -e BASE_URL=http://localhost:8000 stress-test/stress-test.js
//
// Environment:
//   BASE_URL       target (default http://assessment.local)
//   PROFILE        full (default) | lab | smoke
//   MAX_VUS        peak VUs; every stage target is scaled by MAX_VUS / the profile's
//                  peak (10,000 for full and lab, 100 for smoke)
//   TARGET_PATH    path each iteration requests (default /api/data)
//   EXPECT_STATUS  the body's "status" a success carries (default "success"; use "ok"
//                  with TARGET_PATH=/healthz to measure the same profile's ceiling)
//   HOSTS          optional name=address pairs, comma-separated, that k6 resolves itself
//                  (its `hosts` option), e.g. assessment.local=127.0.0.1: no /etc/hosts
//                  line, and no mDNS lookup of a .local name on macOS
//   LOG_FAILED_CHECKS  1: log each iteration that failed a check as
//                  "failed-check <start ms> <end ms>" (Unix time), so that a run with
//                  injected faults (the lab's --chaos) can tell which failures overlapped
//                  a fault; k6's summary cannot be split by time
// See README.md beside this file.

import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';
import { Counter, Rate, Trend } from 'k6/metrics';

const BASE_URL = (__ENV.BASE_URL || 'http://assessment.local').replace(/\/+$/, '');
const PROFILE = (__ENV.PROFILE || 'full').toLowerCase();
const TARGET_PATH = __ENV.TARGET_PATH || '/api/data';
const EXPECT_STATUS = __ENV.EXPECT_STATUS || 'success';
const LOG_FAILED_CHECKS = __ENV.LOG_FAILED_CHECKS === '1';

// Each profile: its stages at full size and the peak they are written for.
const PROFILES = {
  // ASSESSMENT.md, exactly: 1 m -> 1,000; 2 m -> 5,000; 3 m -> 10,000; 5 m hold; 2 m -> 0.
  full: {
    peak: 10000,
    stages: [
      { duration: '1m', target: 1000 },
      { duration: '2m', target: 5000 },
      { duration: '3m', target: 10000 },
      { duration: '5m', target: 10000 },
      { duration: '2m', target: 0 },
    ],
  },
  // The same shape compressed to 3 minutes, for the lab and benchmark runs.
  lab: {
    peak: 10000,
    stages: [
      { duration: '20s', target: 1000 },
      { duration: '40s', target: 5000 },
      { duration: '40s', target: 10000 },
      { duration: '60s', target: 10000 },
      { duration: '20s', target: 0 },
    ],
  },
  // Is it up and correct at all: 100 VUs for 30 s.
  smoke: {
    peak: 100,
    stages: [{ duration: '30s', target: 100 }],
    startVUs: 100,
  },
};

const profile = PROFILES[PROFILE];
if (!profile) {
  throw new Error(`unknown PROFILE '${PROFILE}': use one of ${Object.keys(PROFILES).join(', ')}`);
}
const maxVUs = __ENV.MAX_VUS ? parseInt(__ENV.MAX_VUS, 10) : profile.peak;
if (!Number.isFinite(maxVUs) || maxVUs < 1) {
  throw new Error(`MAX_VUS must be a positive integer, got '${__ENV.MAX_VUS}'`);
}
const HOSTS = {};
for (const pair of (__ENV.HOSTS || '').split(',').filter((p) => p.trim() !== '')) {
  const [name, address] = pair.trim().split('=');
  if (!name || !address) {
    throw new Error(`HOSTS must be name=address[,name=address...], got '${__ENV.HOSTS}'`);
  }
  HOSTS[name] = address;
}
const scale = (target) => (target === 0 ? 0 : Math.max(1, Math.round((target * maxVUs) / profile.peak)));

export const options = {
  ...(Object.keys(HOSTS).length > 0 ? { hosts: HOSTS } : {}),
  scenarios: {
    [PROFILE]: {
      executor: 'ramping-vus',
      startVUs: profile.startVUs ? scale(profile.startVUs) : 0,
      stages: profile.stages.map((s) => ({ duration: s.duration, target: scale(s.target) })),
      gracefulRampDown: '30s',
      gracefulStop: '30s',
    },
  },
  thresholds: {
    http_req_duration: ['p(95)<2000', 'p(99)<5000'],
    error_rate: ['rate<0.01'],
    http_req_failed: ['rate<0.01'],
  },
};

// Rate of iterations whose checks did not all pass.
export const errorRate = new Rate('error_rate');
export const responseTime = new Trend('response_time_ms', true);
export const successfulRequests = new Counter('successful_requests');
export const failedRequests = new Counter('failed_requests');

const params = {
  headers: { Accept: 'application/json' },
  timeout: '10s',
  tags: { name: TARGET_PATH },
};

export function setup() {
  const res = http.get(`${BASE_URL}/readyz`, { headers: { Accept: 'application/json' }, timeout: '10s' });
  if (res.status !== 200) {
    exec.test.abort(
      `${BASE_URL}/readyz answered ${res.status || res.error || 'nothing'}; ` +
        'the service is not ready (is the deployment up and MongoDB reachable?)',
    );
  }
  return { base: BASE_URL, path: TARGET_PATH, profile: PROFILE, maxVUs };
}

function bodyStatus(res) {
  try {
    return res.json('status');
  } catch (e) {
    return undefined;
  }
}

export default function () {
  const start = LOG_FAILED_CHECKS ? Date.now() : 0;
  const res = http.get(`${BASE_URL}${TARGET_PATH}`, params);
  const ok = check(res, {
    'status is 200': (r) => r.status === 200,
    [`body status is "${EXPECT_STATUS}"`]: (r) => bodyStatus(r) === EXPECT_STATUS,
    'response time < 2s': (r) => r.timings.duration < 2000,
  });
  errorRate.add(!ok);
  if (!ok && LOG_FAILED_CHECKS) {
    console.log(`failed-check ${start} ${Date.now()}`);
  }
  responseTime.add(res.timings.duration);
  if (ok) {
    successfulRequests.add(1);
  } else {
    failedRequests.add(1);
  }
}

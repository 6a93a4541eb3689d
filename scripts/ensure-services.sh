#!/usr/bin/env bash
# Makes sure the services the test suite talks to are up on 127.0.0.1:
#   PostgreSQL on 5432 (trust auth for user postgres) and Redis on 6379.
# Starts them when installed but stopped; installs them with apt when missing and running as root.
# Also installs Debian's chromium and chromium-driver when missing: the gallery test drives the
# page in a real headless Chromium (/usr/bin/chromium through /usr/bin/chromedriver).
# The S3-compatible server (SeaweedFS) is started by the test fixtures themselves.
set -euo pipefail

log() { echo "[services] $*"; }

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    log "missing $* and not root: install them (apt-get install -y $*) and re-run"; exit 1
  fi
  log "installing $* with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! pg_up; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then apt_install postgresql; fi
  ver=$(ls /etc/postgresql | sort -n | tail -1)
  log "starting PostgreSQL $ver"
  conf=/etc/postgresql/$ver/main/pg_hba.conf
  # Tests connect as postgres over TCP without a password, as on the project's machines.
  if [ -w "$conf" ] && ! grep -q "bagel-jobs test access" "$conf"; then
    sed -i '1i # bagel-jobs test access\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\nlocal all all trust' "$conf"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start || pg_ctlcluster "$ver" main start
  for _ in $(seq 50); do pg_up && break; sleep 0.2; done
fi
pg_up && log "PostgreSQL ready on 127.0.0.1:5432" || { log "PostgreSQL did not come up"; exit 1; }

if ! redis_up; then
  if ! command -v redis-server >/dev/null 2>&1; then apt_install redis-server; fi
  log "starting Redis"
  mkdir -p /tmp/bagel-jobs-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/bagel-jobs-redis --logfile /tmp/bagel-jobs-redis/redis.log
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
fi
redis_up && log "Redis ready on 127.0.0.1:6379" || { log "Redis did not come up"; exit 1; }

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  apt_install chromium chromium-driver
fi
log "Chromium ready: /usr/bin/chromium with /usr/bin/chromedriver"

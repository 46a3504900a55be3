#!/usr/bin/env bash
# Set up .venv with the test tools and run the whole test suite (CPU, no network needed).
# Extra arguments go to pytest, e.g. scripts/test.sh -k download
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_venv.sh requirements-dev.txt

# tests/dicomweb starts its own Orthanc with the DICOMweb plugin (Debian packages orthanc,
# orthanc-dicomweb). Install them when missing and this runs as root; otherwise, or if apt fails,
# say so in one line and go on: those tests then skip with the reason.
install_orthanc() {
  local log policy_added=""
  log="$(mktemp -t orthanc-apt.XXXXXX.log)"
  # Keep the package's own system service from starting (the tests start their own Orthanc).
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && policy_added=1
  fi
  if DEBIAN_FRONTEND=noninteractive apt-get update -q >"$log" 2>&1 &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q orthanc orthanc-dicomweb >>"$log" 2>&1; then
    rm -f "$log"
  else
    echo "Orthanc install failed (see $log): the DICOMweb tests will skip"
  fi
  if [ -n "$policy_added" ]; then rm -f /usr/sbin/policy-rc.d; fi
}
if ! command -v Orthanc >/dev/null 2>&1 || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    install_orthanc
  else
    echo "Orthanc is not installed and cannot be here (needs root and apt-get): the DICOMweb tests will skip"
  fi
fi

# tests/dicomweb/test_ohif.py opens MONAI Label's OHIF in headless Chromium (Debian package chromium).
# The same way: installed when missing and this runs as root; otherwise one line, and those tests skip.
install_chromium() {
  local log
  log="$(mktemp -t chromium-apt.XXXXXX.log)"
  if DEBIAN_FRONTEND=noninteractive apt-get update -q >"$log" 2>&1 &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >>"$log" 2>&1; then
    rm -f "$log"
  else
    echo "Chromium install failed (see $log): the OHIF tests will skip"
  fi
}
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    install_chromium
  else
    echo "Chromium is not installed and cannot be here (needs root and apt-get): the OHIF tests will skip"
  fi
fi

# --durations: the slowest tests, so a suite that grows past its budget says where the time went.
exec .venv/bin/python -m pytest -p no:cacheprovider --durations=30 "$@"

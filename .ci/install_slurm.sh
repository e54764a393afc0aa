#!/usr/bin/env bash
# CI: install SLURM and MUNGE (Debian/Ubuntu packages) for tests/slurm/, which start their own
# two-node cluster on this machine (tests/slurm/conftest.py). The fixture installs them too when
# they are missing; doing it here keeps apt's time and output out of the test run. Needs root
# or passwordless sudo; otherwise it says so and the SLURM tests skip with the same reason.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
  && command -v munged >/dev/null; then
  echo "slurm: $(slurmd -V) and munge already installed"
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then sudo=(); elif sudo -n true 2>/dev/null; then sudo=(sudo -n); else
  echo "slurm: not root and no passwordless sudo: cannot install slurm-wlm munge (tests/slurm skip)"
  exit 0
fi
apt=(env DEBIAN_FRONTEND=noninteractive apt-get -q)  # env: sudo drops the caller's variables
"${sudo[@]}" "${apt[@]}" update
"${sudo[@]}" "${apt[@]}" install -y --no-install-recommends slurm-wlm munge
echo "slurm: installed $(slurmd -V)"

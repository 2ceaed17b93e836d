# shellcheck shell=bash
# Sourced by scripts/install-tools and scripts/real-waldur.
#
# One apt-get at a time: .ci/run runs those two side by side, and apt refuses a second process
# on its lock instead of waiting for it (seen on a fresh machine: "Could not get lock
# /var/lib/apt/lists/lock"). flock serialises the two scripts; DPkg::Lock::Timeout makes apt
# wait for any other holder.
apt_get() {
  flock /tmp/waldur-operator-apt.lock apt-get -o DPkg::Lock::Timeout=600 "$@"
}

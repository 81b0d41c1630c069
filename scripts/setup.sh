#!/usr/bin/env bash
# Set up everything qiothread needs on a Debian machine, as root:
# the Debian packages it loads at run time (libaio for aio=native,
# python3-venv), a virtual environment, and the project in it.
# Safe to run again: it does only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}

need_pkgs=()
have_lib() { ldconfig -p 2>/dev/null | grep -q "$1"; }
have_lib 'libaio\.so\.1' || need_pkgs+=(libaio)
have_lib 'libatomic\.so\.1' || need_pkgs+=(libatomic1)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_pkgs+=(python3-venv)
command -v losetup >/dev/null || need_pkgs+=(mount)

if ((${#need_pkgs[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: missing ${need_pkgs[*]}; run as root or install them" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    pkgs=()
    for p in "${need_pkgs[@]}"; do
        if [ "$p" = libaio ]; then
            # Debian 13 renamed the package for the 64-bit time_t ABI.
            if apt-cache show libaio1t64 >/dev/null 2>&1; then
                pkgs+=(libaio1t64)
            else
                pkgs+=(libaio1)
            fi
        else
            pkgs+=("$p")
        fi
    done
    apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
stamp="$venv/.qiothread-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log="$venv/pip-install.log"
    if ! { "$venv/bin/python" -m pip install -q --upgrade pip &&
           "$venv/bin/python" -m pip install -q -e '.[test]'; } >"$log" 2>&1
    then
        cat "$log" >&2
        echo "setup: pip install failed (log above, also in $log)" >&2
        exit 1
    fi
    echo "$want" >"$stamp"
fi

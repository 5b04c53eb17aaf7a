# Sourced by the example scripts (not run on its own). Sets:
#   PROBE_ROOT     the repository root
#   PROBE_PYTHON   python to run: $PROBE_PYTHON, else the repository's .venv, else python3
#   PROBE_ARGS     the flags in the PROBE settings file: $PROBE_ARGS_FILE if set (empty: none),
#                  else examples/probe_args.txt
# and defines run_or_print: runs its arguments, or prints them (shell-quoted, one line) when
# PROBE_DRY_RUN=1.
# shellcheck shell=bash

PROBE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PROBE_PYTHON:-}" ]; then
    if [ -x "$PROBE_ROOT/.venv/bin/python" ]; then
        PROBE_PYTHON="$PROBE_ROOT/.venv/bin/python"
    else
        PROBE_PYTHON=python3
    fi
fi

# One flag per line ("--probe-replica-slots-per-rank 3" or "--probe-replica-slots-per-rank=3");
# blank lines and lines starting with # are skipped; values cannot contain spaces.
probe_args_from() {
    local file="$1" line words
    PROBE_ARGS=()
    [ -n "$file" ] || return 0
    if [ ! -f "$file" ]; then
        echo "PROBE settings file $file does not exist" >&2
        return 1
    fi
    while IFS= read -r line || [ -n "$line" ]; do
        line="${line#"${line%%[![:space:]]*}"}"
        case "$line" in
            '' | '#'*) continue ;;
        esac
        read -ra words <<<"$line"
        PROBE_ARGS+=("${words[@]}")
    done <"$file"
}

run_or_print() {
    if [ "${PROBE_DRY_RUN:-0}" != 0 ]; then
        printf '%q ' "$@"
        printf '\n'
        return 0
    fi
    "$@"
}

probe_args_from "${PROBE_ARGS_FILE-$PROBE_ROOT/examples/probe_args.txt}"

# Sourced by scripts/run and scripts/test: make .venv (once) and install embedq with the given extras.
# torch goes first and pinned: `pip install torch==2.13.0` takes the local CPU wheel where one is
# offered and the CUDA build elsewhere; torchvision is pinned to the build made for that torch.
embedq_venv() {
    local extras="$1" root venv stamp want
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    venv="$root/.venv"
    want="$(cat "$root/pyproject.toml" "$root/scripts/_venv.sh" | sha1sum | cut -c1-12)-$extras"
    stamp="$venv/.embedq-installed"
    if [ ! -x "$venv/bin/python" ]; then
        echo "embedq: creating $venv" >&2
        "${PYTHON:-python3}" -m venv "$venv" || return 1
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "embedq: installing dependencies into $venv (first run takes a few minutes)" >&2
        "$venv/bin/pip" install -q --upgrade pip || return 1
        "$venv/bin/pip" install -q "torch==${EMBEDQ_TORCH_VERSION:-2.13.0}" "torchvision==${EMBEDQ_TORCHVISION_VERSION:-0.28.0}" || return 1
        "$venv/bin/pip" install -q -e "$root${extras:+[$extras]}" || return 1
        echo "$want" > "$stamp"
    fi
    export PATH="$venv/bin:$PATH"
}

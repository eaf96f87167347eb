# Sourced by bench/llmc_env.sh and bench/gptqmodel_env.sh: a tool's own virtualenv, made once.
# tool_env_begin VENV WANT NAME: returns from the calling script (exit 0) when VENV's stamp already records WANT;
# otherwise makes the virtualenv if needed and sets VPY (its python). tool_env_end: writes the stamp, says how long.
tool_env_begin() {
  TOOL_VENV="$1"; TOOL_WANT="$2"; TOOL_NAME="$3"; TOOL_STAMP="$TOOL_VENV/.installed"
  if [ "$(cat "$TOOL_STAMP" 2>/dev/null)" = "$TOOL_WANT" ]; then
    echo "$TOOL_NAME environment ready in $TOOL_VENV" >&2; exit 0
  fi
  [ -x "$TOOL_VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$TOOL_VENV"
  VPY="$TOOL_VENV/bin/python"
  TOOL_START=$(date +%s)
}
tool_env_end() {
  echo "$TOOL_WANT" > "$TOOL_STAMP"
  echo "$TOOL_NAME installed in $TOOL_VENV in $(( $(date +%s) - TOOL_START )) s ($(du -sh "$TOOL_VENV" | cut -f1))" >&2
}

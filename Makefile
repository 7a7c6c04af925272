# The two commands a fresh machine needs: `make demo` and `make test`. Both set everything up first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# fonts-noto-cjk and fonts-noto-core: glyphs for the demo's Chinese, Japanese and Hindi in `omni view` and `omni report`
APT_PACKAGES := ffmpeg espeak-ng asterisk-core-sounds-en-wav libchromaprint-tools chromium fonts-noto-cjk fonts-noto-core
DEMO_OUT ?= demo_out

.PHONY: setup apt venv demo test lint bench clean

setup: apt venv

apt:
	@missing=""; \
	command -v ffmpeg >/dev/null || missing="$$missing ffmpeg"; \
	command -v espeak-ng >/dev/null || missing="$$missing espeak-ng"; \
	command -v fpcalc >/dev/null || missing="$$missing libchromaprint-tools"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	[ -d /usr/share/asterisk/sounds/en ] || missing="$$missing asterisk-core-sounds-en-wav"; \
	fc-list ':lang=zh' family 2>/dev/null | grep -q 'Noto Sans CJK' || missing="$$missing fonts-noto-cjk"; \
	fc-list ':lang=hi' family 2>/dev/null | grep -q 'Noto Sans Devanagari' || missing="$$missing fonts-noto-core"; \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e '.[all,test]'
	touch $@

demo: setup
	$(VENV)/bin/omni demo --out $(DEMO_OUT)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf $(DEMO_OUT) .pytest_cache

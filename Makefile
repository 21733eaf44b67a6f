# LMDeploy Lab: one-word commands. See README.md.
.PHONY: lab test gpu-test wheelhouse turbomind-chunks doctor clean-notebooks

lab:            ## set up .venv if needed and open JupyterLab on notebooks/
	scripts/lab.sh

test:           ## set up .venv if needed, run labkit's tests and every notebook (nbval)
	scripts/test.sh

gpu-test:       ## on a GPU machine: the whole suite with gpu cells, summary under artifacts/
	scripts/gpu-suite.sh

# The runner takes 64 MiB per command: drop wheels nothing imports there (debugpy, jedi: optional
# in ipykernel / IPython; widgetsnbextension: the classic-notebook front end) to make room for gradio.
wheelhouse:     ## build the packages for an offline GPU runner into .wheelhouse/
	rm -rf .wheelhouse
	../shared/gpu-runner/make-wheelhouse .wheelhouse -r requirements-gpu.txt
	rm -f .wheelhouse/debugpy-*.whl .wheelhouse/jedi-*.whl .wheelhouse/widgetsnbextension-*.whl
	du -sh .wheelhouse

# TurboMind on the CUDA-13 runner: the full lmdeploy wheel + CUDA 12 cuBLAS/cudart in 58 MiB chunks
# (.turbomind/c00.. and setup/, ~600 MB, ~2 min); scripts/gpu-suite.sh installs them from /tmp/labkit-tm.
turbomind-chunks: ## build TurboMind's chunks for the offline GPU runner into .turbomind/
	../shared/gpu-runner/turbomind/make-chunks .turbomind

doctor:
	.venv/bin/labkit doctor

clean-notebooks: ## strip outputs before committing
	.venv/bin/python scripts/clean_notebooks.py notebooks/*.ipynb

"""AWQ W4A16 quantization through lmdeploy's own `auto_awq` (lab 03), and what it changes:
size on disk, the course's command next to today's, and quality (perplexity and next-token agreement
on any machine, lmdeploy's perplexity on a GPU).

    out = labkit.quant.awq("trained:tiny-chat")          # cached under LABKIT_HOME/quantized
    labkit.quant.compare_sizes({"bf16": model_dir, "awq": out})
    labkit.quant.quality(model_dir, out)                  # perplexities, agreement, the lab's bounds

One name space over four modules, along the seams of the job: `quant_calib` (calibration text and the one
swap of lmdeploy's loader), `quant_run` (the AWQ run and its cache, sizes), `quant_command` (the course's
command vs lmdeploy 0.18's), `quant_quality` (quality measures and the broken copies that must fail them).
"""
from __future__ import annotations

from labkit.quant_calib import (HUB_SETS, CalibSource, QuantError, _calibration_loader, _local_samples,  # noqa: F401
                                calibration_source, check_calib_text)
from labkit.quant_command import (COURSE_COMMAND, check_command, cli_flags, command_changes,  # noqa: F401
                                  course_command, current_command)
from labkit.quant_quality import *  # noqa: F401,F403
from labkit.quant_quality import _windows  # noqa: F401
from labkit.quant_run import (LOG, META, STATS_FILES, _device, _done, _key, awq, check_params,  # noqa: F401
                              compare_sizes, disk_size, info, lab_settings)

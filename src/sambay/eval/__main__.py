"""``python -m sambay.eval <lm_eval arguments>``: lm-eval's command line with ``--model sambay`` registered.

For lm-eval releases that do not discover backends through entry points (0.4.13 and before); newer ones
find ``lm_eval --model sambay`` by themselves. Example::

    python -m sambay.eval --model sambay --model_args path=DIR,dtype=bfloat16 --tasks hellaswag --device cuda
"""

from sambay.eval.harness import main

main()

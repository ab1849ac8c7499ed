"""``python -m modeling_tot_cakt.demo``: the whole offline job (see :mod:`.run_demo`)."""

from .run_demo import main

main()

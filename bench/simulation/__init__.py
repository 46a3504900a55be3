"""Active-learning simulation (issue 5): does the importance strategy save annotation, and how much?

The pieces: ``config`` (presets), ``data`` (phantom pools), ``annotator`` (the simulated annotator),
``loop`` (rounds of pick, revise, retrain, test), ``dice`` (test Dice), ``report`` (CSV, PNG,
summary). ``bench/simulate.py`` is the command.
"""

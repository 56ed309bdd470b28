"""The application: gca_pyg's commands, and what only they need.

One module per command, each a thin layer that parses its arguments, calls the library and prints:
:mod:`~gca_pyg.app.train`, :mod:`~gca_pyg.app.evaluate`, :mod:`~gca_pyg.app.report`,
:mod:`~gca_pyg.app.index`, :mod:`~gca_pyg.app.search`, :mod:`~gca_pyg.app.serve`,
:mod:`~gca_pyg.app.export`, :mod:`~gca_pyg.app.convert`. Their command-line names stay
``python -m gca_pyg.<command>`` (one-line modules at the package's top forward to them). What only
the commands need lives here too: a run's logs (:mod:`~gca_pyg.app.runs`) and the HTML of the
report, search and serve pages (:mod:`~gca_pyg.app.html`).

Nothing in the library (the rest of :mod:`gca_pyg`) imports from here.
"""

"""The pages a person looks at: ``report.html`` (``nnUNetv2_evaluate_ood``) and ``review.html`` (``--report`` of
``nnUNetv2_predict_ood``).

Everything is drawn from files already on disk (images, segmentations, labels, OOD maps, score tables); nothing
is predicted again. Modules, one job each:

* :mod:`.volumes`: read an image, label or map file into a ``(Z, Y, X)`` array (channel 0, component 0);
* :mod:`.slices`: which axial slice a thumbnail shows;
* :mod:`.thumbnails`: windowing, label and heat overlays, PNG bytes;
* :mod:`.cases`: one case's files -> its chosen slices -> its thumbnails (shared by both pages);
* :mod:`.page`: HTML building blocks (escaping, tables, the inline style sheet);
* :mod:`.writer`: the page and its image folder written atomically;
* :mod:`.ranking`: the review's order of the cases (no heavy imports: the predict command line uses its checks);
* :mod:`.evaluation_report` and :mod:`.review`: the two pages; the parts of the former in
  :mod:`.evaluation_sections` (headline, tables, plots), :mod:`.galleries` and :mod:`.image_sources`.

Only light modules are imported here: the command lines import this package before they check their arguments.
"""

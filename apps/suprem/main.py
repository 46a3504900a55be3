"""MONAI Label app serving the SuPreM backbones for active annotation of abdominal CT.

    monailabel start_server --app apps/suprem --studies <folder or DICOMweb URL> \
        --conf models all --conf labels atlas25 --host 127.0.0.1

Thin on purpose: it reads the conf, builds the tasks from lib/, and hands them to MONAILabelApp.
"""

import logging
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from monailabel.interfaces.app import MONAILabelApp  # noqa: E402

from lib.app import build_tasks, checked_dicomweb_datastore, checked_local_datastore, stop_on_signals  # noqa: E402
from lib.infers.segmentation import warm_label_writer  # noqa: E402
from lib.ohif import serve_revision_mode  # noqa: E402
from lib.errors import checked_image, checked_model, guarded  # noqa: E402
from lib.stopping import stop_requested  # noqa: E402

logger = logging.getLogger(__name__)


class SuPreMApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.serving = False  # True in the server process; MONAI Label's train / scoring subprocesses stay False
        self.tasks = build_tasks(app_dir, studies, conf)
        # The round manager and its ``round`` train task (MONAI Label offers it unless train tasks are off).
        self.tasks.start_rounds(self.datastore)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SuPreM active annotation",
            description="SuPreM backbones (U-Net, Swin UNETR, SegResNet) for 25 abdominal structures, "
            "with AbdomenAtlas-8K importance ranking",
            version="0.1.0",
            # Names in class-index order, as MONAI Label lists an app's labels itself (OHIF's panel appends
            # to this list; the per-model name -> index dicts stay in each model's info).
            labels=sorted(self.tasks.label_dict, key=self.tasks.label_dict.get),
        )
        stop_on_signals(self.on_stop_signal)

    def server_mode(self, mode: bool):
        super().server_mode(mode)
        self.serving = mode
        server = sys.modules.get("monailabel.app")  # MONAI Label's FastAPI server, in the server process only
        if mode and server is not None:
            serve_revision_mode(server.app)  # /ohif/suprem: MONAI Label's panel with OHIF's brush and SEG export

    def on_stop_signal(self, signum):
        # The server ends its subprocesses; those (train, scoring) only unwind, logging a cut round.
        if self.serving:
            self.tasks.stop()

    def on_init_complete(self):
        super().on_init_complete()
        warm_label_writer()  # ITK's lazy loading, before the first infer request (a few seconds)
        self.tasks.rounds.start()

    def on_save_label(self, image_id, label_id):
        res = super().on_save_label(image_id, label_id)
        if image_id in self.datastore().get_labeled_images():  # a final label, not a model's draft
            self.tasks.rounds.label_saved(image_id)
        return res

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return self.tasks.connect(checked_dicomweb_datastore(super().init_datastore(), self.tasks.label_dict))
        return self.tasks.connect(checked_local_datastore(self.studies, self.tasks.label_dict.values()))

    def init_infers(self):
        return self.tasks.infers

    def init_trainers(self):
        return self.tasks.trainers

    def init_strategies(self):
        return self.tasks.strategies

    def init_scoring_methods(self):
        return self.tasks.scoring

    def info(self):
        meta = super().info()
        meta.update(self.tasks.info())
        return meta

    def async_scoring(self, method, params=None):
        # MONAI Label queues a scoring run after every Next Sample. A run still waiting in the queue will
        # see everything a new one would, so 16 annotators asking at once start one run, not 16.
        from monailabel.utils.async_tasks.utils import tasks

        if stop_requested():  # stopping: no new scoring process
            return {}
        if self.serving and any(t.get("status") == "SUBMITTED" for t in tasks("scoring")):
            return {}
        return super().async_scoring(method, params)

    def infer(self, request, datastore=None):
        ds = datastore or self.datastore()
        checked_model(self.tasks.infers, request.get("model"))
        image = checked_image(ds, request.get("image"))
        what = f"infer {request.get('model')} on {os.path.basename(str(image))!r}"
        result = guarded(super().infer, what, dict(request, image=image), datastore)
        self.tasks.keep_preannotation(ds, dict(request, image=image), result)  # what the annotator starts from
        return result

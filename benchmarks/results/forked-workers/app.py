import json, os
import btdeploy
from btdeploy.model.inputs import sample_inputs

MODEL = btdeploy.load(os.environ["EXPORT"], head="itm", backend=os.environ.get("BACKEND", "onnxruntime"))
FEEDS = sample_inputs(MODEL.config, 1, 16, seed=3)
MODEL(**FEEDS)  # warm-up in the master, as a preloaded app often does

def app(environ, start_response):
    logits = MODEL(**FEEDS).logits
    body = json.dumps({"pid": os.getpid(), "logit": float(logits[0, 1])}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]

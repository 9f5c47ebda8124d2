# -*- coding: utf-8 -*-
"""Action dsfleet_infer: the controller's side of playbooks/infer.yml. Runs on the controller only.

    - dsfleet_infer: {op: inputs, model: M, prompt: "", prompts: FILE, prompt_field: prompt, runs_dir: runs, step: 0}
      # -> source {kind: run|controller|host, path, label, run_id, step}, info (dsfleet_modelinfo of the model
      #    when it lies on the controller), prompts [{index, prompt|messages}], stats {count, max_chars, chat}
    - dsfleet_infer: {op: render, plan: P, prompts: [...], dest: runs/<id>}
      # -> infer-plan.json, prompts.jsonl, hosts/<name>/{ds_inference_config.json, prompts.jsonl}
    - dsfleet_infer: {op: collect, plan: P, dest: runs/<id>}
      # -> generations.jsonl (every prompt once, in input order) and summary.json from hosts/<name>/out/
"""

import glob
import json
import os
import re
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (os.path.join(_ROOT, "lib"), os.path.join(_ROOT, "train")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from ansible.errors import AnsibleActionFail  # noqa: E402
from ansible.plugins.action import ActionBase  # noqa: E402
from dsfleet_modelinfo import model_info  # noqa: E402

from dsfleet_core import infer as I  # noqa: E402
from dsfleet_core import knobs as K  # noqa: E402


class InputError(Exception):
    pass


def _step_of(path):
    m = re.search(r"export-global_step(\d+)$", path.rstrip("/"))
    return int(m.group(1)) if m else None


def resolve_model(model, runs_dir, step=0):
    """Where the model is: a run of runs_dir (its export on the controller, or the export still to make), a
    directory on the controller, or else a path / hub id on the hosts."""
    model = str(model or "").strip()
    if not model:  # the newest training run
        runs = sorted(glob.glob(os.path.join(runs_dir, "*", "plan.json")), key=os.path.getmtime)
        if not runs:
            raise InputError("model is not set and %s holds no run; pass -e model=RUN_ID, a model directory or a "
                             "hub id" % runs_dir)
        model = os.path.basename(os.path.dirname(runs[-1]))
    if K.RUN_ID.fullmatch(model) and os.path.isfile(os.path.join(runs_dir, model, "plan.json")):
        exports = {}
        for path in glob.glob(os.path.join(runs_dir, model, "export-global_step*")):
            if _step_of(path) is not None and glob.glob(os.path.join(path, "*.safetensors")):
                exports[_step_of(path)] = os.path.abspath(path)
        chosen = step if step else (max(exports) if exports else 0)
        path = exports.get(chosen)
        return {"kind": "run" if path is None else "controller", "run_id": model, "step": chosen or None,
                "path": path, "label": "run %s step %s" % (model, chosen or "newest"), "exports": sorted(exports)}
    if "/" not in model and os.path.isdir(os.path.join(_ROOT, "train", "presets", model)):
        raise InputError("model=%s is a bundled preset: a config and a tokenizer, no weights; train it "
                         "(./dsfleet launch.yml -e model=%s) and ask the run: -e model=<its run id>" % (model, model))
    local = os.path.abspath(os.path.expanduser(model))
    if os.path.isdir(local):
        return {"kind": "controller", "path": local, "label": model, "run_id": None, "step": None}
    return {"kind": "host", "path": model, "label": model, "run_id": None, "step": None}


def read_prompts(prompt, prompts, field):
    """[{index, prompt | messages}] from one prompt or a JSON lines file, with an error naming the line."""
    prompt, prompts = str(prompt or ""), str(prompts or "")
    if prompt and prompts:
        raise InputError("pass either prompt= or prompts=, not both")
    if prompt:
        return [{"index": 0, "prompt": prompt}]
    if not prompts:
        raise InputError("there is nothing to answer: pass -e prompt=\"Once upon a time\" or -e prompts=FILE.jsonl "
                         "(one JSON object a line with a \"%s\" string or a \"messages\" list)" % field)
    path = os.path.expanduser(prompts)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError("cannot read prompts=%s: %s; pass a JSON lines file on the controller" % (prompts, e)) from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise InputError("prompts=%s line %d is not JSON (%s): the file must be JSON lines, one object a line, "
                             "e.g. {\"%s\": \"Once upon a time\"}" % (prompts, n, e, field)) from None
        if not isinstance(rec, dict):
            raise InputError("prompts=%s line %d is %s, not an object; write {\"%s\": \"...\"}"
                             % (prompts, n, type(rec).__name__, field))
        if isinstance(rec.get(field), str):
            out.append({"index": len(out), "prompt": rec[field]})
        elif isinstance(rec.get("messages"), list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in rec["messages"]) and rec["messages"]:
            out.append({"index": len(out), "messages": rec["messages"]})
        else:
            raise InputError("prompts=%s line %d has no \"%s\" string (nor a \"messages\" list of {role, content}); "
                             "its fields: %s. Name the field with -e prompt_field=NAME"
                             % (prompts, n, field, ", ".join(sorted(rec)) or "none"))
    if not out:
        raise InputError("prompts=%s holds no prompt; write one JSON object a line" % prompts)
    return out


def _text_len(rec):
    return len(rec["prompt"]) if "prompt" in rec else sum(len(m["content"]) + 16 for m in rec["messages"])


def inputs(args):
    source = resolve_model(args.get("model"), args.get("runs_dir") or "runs", int(args.get("step") or 0))
    prompts = read_prompts(args.get("prompt"), args.get("prompts"), args.get("prompt_field") or "prompt")
    info = model_info(source["path"]) if source["kind"] == "controller" else None
    if info is not None and not info["found"]:
        raise InputError("model=%s: %s" % (args.get("model"), info["error"]))
    return {"source": source, "info": info, "prompts": prompts,
            "stats": {"count": len(prompts), "max_chars": max(_text_len(p) for p in prompts),
                      "chat": any("messages" in p for p in prompts)}}


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def render(plan, prompts, dest):
    for host in plan["hosts"]:  # a run id used again: no generations of the earlier attempt are merged
        for path in glob.glob(os.path.join(dest, "hosts", host["name"], "out", "*")):
            os.remove(path)
    files = I.host_files(plan, prompts)
    files["prompts.jsonl"] = "".join(json.dumps(p) + "\n" for p in prompts)
    for name, text in files.items():
        _write(os.path.join(dest, name), text)
    return sorted(files)


def collect(plan, dest):
    """Merge the hosts' generations into generations.jsonl (input order) and write summary.json."""
    rows, hosts = {}, []
    for host in plan["hosts"]:
        out = os.path.join(dest, "hosts", host["name"], "out")
        got, done = 0, []
        for path in sorted(glob.glob(os.path.join(out, "generations-*.jsonl"))):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        rec = json.loads(line)
                        rec["host"] = host["name"]
                        rows[rec["index"]] = rec
                        got += 1
        for path in sorted(glob.glob(os.path.join(out, "done-*.json"))):
            with open(path) as f:
                done.append(json.load(f))
        tokens = sum(d["tokens"] for d in done)
        seconds = max([d["seconds"] for d in done] or [0])
        hosts.append({"name": host["name"], "prompts": got, "expected": host["prompts"][1] - host["prompts"][0],
                      "tokens": tokens, "seconds": seconds, "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
                      "load_seconds": max([d["load_seconds"] for d in done] or [0]), "tp": host["tp"],
                      "params_per_rank": max([d.get("params_per_rank", 0) for d in done] or [0]),
                      "replicas": host["replicas"], "dtype": host["dtype"]})
    missing = [i for i in range(plan["prompts"]) if i not in rows]
    ordered = [rows[i] for i in sorted(rows)]
    _write(os.path.join(dest, "generations.jsonl"), "".join(json.dumps(r) + "\n" for r in ordered))
    tokens = sum(h["tokens"] for h in hosts)
    seconds = max([h["seconds"] for h in hosts] or [0])
    summary = {"run_id": plan["run_id"], "model": plan["model"]["label"], "prompts": plan["prompts"],
               "answered": len(ordered), "missing": missing, "tokens": tokens, "seconds": seconds,
               "tokens_per_s": round(tokens / seconds, 1) if seconds else None, "hosts": hosts,
               "generation": plan["generation"]}
    _write(os.path.join(dest, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary, ordered


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        a = self._task.args
        op = a.get("op")
        try:
            if op == "inputs":
                result.update(inputs(a))
            elif op == "render":
                result.update(changed=True, written=render(a["plan"], a["prompts"], a["dest"]))
            elif op == "collect":
                summary, rows = collect(a["plan"], a["dest"])
                result.update(summary=summary, first=rows[:3])
            else:
                raise AnsibleActionFail("dsfleet_infer: op must be inputs, render or collect, not %r" % op)
        except InputError as exc:
            result.update(failed=True, msg="dsfleet infer: %s" % exc)
        except (OSError, ValueError, KeyError) as exc:
            raise AnsibleActionFail("dsfleet_infer %s: %s" % (op, exc)) from exc
        return result

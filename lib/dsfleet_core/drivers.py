"""The drivers plan of one host: which GPU driver it needs, from which repository, with which packages (pure).

``driver_plan(os_facts, gpu, knobs, os_vars)`` reads

- ``os_facts``: the host's ``ansible_facts`` subset {os_family, distribution, distribution_major_version,
  distribution_version, distribution_release, kernel, architecture};
- ``gpu``: its ``dsfleet_gpu`` fact (gpu_facts: ``accelerator``, ``gpus``, ``driver_version``, ``undriven``);
- ``knobs``: the drivers_* role options (roles/drivers/defaults/main.yml);
- ``os_vars``: the OS family's data (roles/drivers/vars/<family>.yml): per vendor and distribution the signing
  keys, repositories and packages, with ``{branch}``, ``{rocm}``, ``{codename}``, ``{major}``, ``{version}``,
  ``{kernel}``, ``{intel_channel}`` filled in here;

and returns {"vendors": [one entry per vendor whose GPUs the host has], "install": bool, "keys", "repos",
"packages", "modules", "groups" (all that the install would do, in order), "text": [what to print]}. A vendor
is ``ok`` (its tool answers: left untouched, whatever its branch, unless ``drivers_nvidia_replace``), ``missing``
(GPUs on the PCI bus, no driver answers), ``other_branch`` (NVIDIA answers with another branch and
``drivers_nvidia_replace`` asks for the pinned one) or
``unsupported`` (no recipe for this OS: says which OSes have one). Nothing is installed unless ``drivers_install``.
"""

from . import PlanError

VENDORS = ("nvidia", "amd", "intel")
NAMES = {"nvidia": "NVIDIA", "amd": "AMD", "intel": "Intel"}


def _fill(value, fields):
    if isinstance(value, str):
        return value.format(**fields)
    if isinstance(value, list):
        return [_fill(v, fields) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, fields) for k, v in value.items()}
    return value


def _recipe(os_vars, vendor, os_facts, knobs):
    """The vendor's recipe for this distribution (os_vars[vendor][distribution] or [default]), or None."""
    table = (os_vars.get("drivers") or {}).get(vendor) or {}
    dist = str(os_facts.get("distribution") or "")
    recipe = table.get(dist) or table.get("default")
    if vendor == "nvidia" and recipe and isinstance(recipe, dict) and "sources" in recipe:
        source = knobs.get("drivers_nvidia_source") or recipe.get("source_default")
        if source not in recipe["sources"]:
            raise PlanError("drivers_nvidia_source=%s: %s knows %s; pass one of them"
                            % (source, dist, ", ".join(sorted(recipe["sources"]))))
        recipe = recipe["sources"][source]
    if recipe and os_facts.get("architecture") not in (recipe.get("architectures") or ["x86_64"]):
        return None
    if recipe and recipe.get("releases") and os_facts.get("distribution_release") not in recipe["releases"]:
        return None
    return recipe


def driver_plan(os_facts, gpu, knobs, os_vars):
    knobs = dict(knobs or {})
    gpu = gpu or {}
    os_facts = os_facts or {}
    branch = str(knobs.get("drivers_nvidia_branch") or "")
    fields = {"branch": branch, "rocm": str(knobs.get("drivers_rocm_version") or ""),
              "intel_channel": str(knobs.get("drivers_intel_channel") or ""),
              "codename": str(os_facts.get("distribution_release") or ""),
              "major": str(os_facts.get("distribution_major_version") or ""),
              "version": str(os_facts.get("distribution_version") or ""),
              "kernel": str(os_facts.get("kernel") or ""), "arch": str(os_facts.get("architecture") or ""),
              "debian_signed_by": str(knobs.get("debian_signed_by") or "")}
    install = bool(knobs.get("drivers_install"))
    dist = "%s %s" % (os_facts.get("distribution"), os_facts.get("distribution_version"))
    vendors = []
    working = gpu.get("accelerator") if gpu.get("gpus") else None
    for vendor in VENDORS:
        missing = next((u for u in gpu.get("undriven") or [] if u.get("vendor") == vendor), None)
        if vendor != working and missing is None:
            continue
        entry = {"vendor": vendor, "count": len(gpu.get("gpus") or []) if vendor == working else missing["count"],
                 "driver_version": gpu.get("driver_version") if vendor == working else None}
        recipe = _recipe(os_vars, vendor, os_facts, knobs)
        if vendor == working:
            have = str(gpu.get("driver_version") or "")
            if vendor == "nvidia" and branch and recipe and recipe.get("pins_branch") and \
                    have.split(".")[0] != branch and knobs.get("drivers_nvidia_replace"):
                entry.update(state="other_branch", reason="driver %s answers, not branch %s (drivers_nvidia_replace)"
                             % (have, branch))
            else:
                entry.update(state="ok", reason="driver %s answers" % (have or "(version unknown)"))
                if vendor == "nvidia" and branch and recipe and recipe.get("pins_branch") and \
                        have.split(".")[0] != branch:
                    entry["reason"] += "; kept (not branch %s: drivers_nvidia_replace: true replaces it)" % branch
                recipe = None
        else:
            entry.update(state="missing", reason=missing.get("reason") or "no tool answers")
        if entry["state"] != "ok" and recipe is None:
            entry["state"] = "unsupported"
            entry["reason"] += "; dsfleet has no %s driver recipe for %s on %s (it has: %s): install it by hand" % (
                NAMES[vendor], dist, os_facts.get("architecture"),
                ", ".join(sorted(((os_vars.get("drivers") or {}).get(vendor) or {}).keys())) or "none")
        if recipe is not None:
            entry["recipe"] = _fill({k: recipe.get(k) or [] for k in ("pre", "keys", "repos", "packages", "modules",
                                                                      "groups", "notes")}, fields)
            for repo in entry["recipe"]["repos"]:
                if "signed_by" in repo and not repo["signed_by"]:
                    del repo["signed_by"]
            entry["recipe"]["dkms"] = bool(recipe.get("dkms"))
        vendors.append(entry)

    todo = [v for v in vendors if v.get("recipe") and v["state"] in ("missing", "other_branch")]
    plan = {"install": install and bool(todo), "vendors": vendors, "pre": [], "keys": [], "repos": [],
            "packages": [], "modules": [], "groups": [], "text": [],
            "reset_modules": sorted(set(m.split(":")[0] for v in todo if v["state"] == "other_branch"
                                        for m in v["recipe"]["modules"]))}
    for v in todo:
        for key in ("pre", "keys", "repos", "packages", "modules", "groups"):
            plan[key] += [item for item in v["recipe"][key] if item not in plan[key]]
    if any(v["recipe"]["dkms"] for v in todo):
        # a kernel module built by DKMS (nvidia, amdgpu-dkms) needs the running kernel's headers
        # (and the metapackage that follows kernel upgrades, so the module is rebuilt for the next kernel)
        extra = (os_vars.get("kernel_headers_meta") or {}).get(str(os_facts.get("distribution") or "")) or []
        plan["packages"] = _fill((os_vars.get("kernel_headers") or []) + extra, fields) + plan["packages"]
    for v in vendors:
        line = "%d %s GPU%s: %s (%s)" % (v["count"], NAMES[v["vendor"]], "" if v["count"] == 1 else "s",
                                          v["state"].replace("_", " "), v["reason"])
        if v in todo:
            line += "; %s: %s" % ("installing" if install else "drivers_install: true would install",
                                  ", ".join(v["recipe"]["pre"] + v["recipe"]["packages"]
                                            + ["@" + m for m in v["recipe"]["modules"]]))
            line += "".join("; " + n for n in v["recipe"]["notes"])
        plan["text"].append(line)
    if not vendors:
        plan["text"].append("no GPU on the PCI bus: nothing to install")
    return plan

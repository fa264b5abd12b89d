// The study page: asks the server for the participant's next screen, shows it, sends the
// answer (click or key), repeats. The server decides what comes next from the responses file,
// so a reload (or another device) continues where the participant stopped.
"use strict";
(() => {
  const root = document.getElementById("study");
  const api = root.dataset.api;
  const $ = (id) => document.getElementById(id);
  const KEYS = { ArrowLeft: "left", 1: "left", ArrowDown: "undecided", 2: "undecided" };
  Object.assign(KEYS, { ArrowRight: "right", 3: "right" });
  let item = null;
  let busy = true;

  function setState(state) {
    root.dataset.state = state;
  }

  function enable(on) {
    busy = !on;
    for (const button of document.querySelectorAll("[data-choice]")) button.disabled = !on;
  }

  function fail(message) {
    $("error").textContent = message;
    $("error").hidden = false;
  }

  function load(img, src) {
    return new Promise((resolve, reject) => {
      img.onload = () => {
        img.classList.toggle("small", img.naturalWidth < 128); // crisp upscaling
        resolve();
      };
      img.onerror = () => reject(new Error(`image ${src} did not load`));
      img.src = src;
    });
  }

  async function json(response) {
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  }

  async function next() {
    setState("loading");
    enable(false);
    let data;
    try {
      data = await json(await fetch(`${api}/next`, { cache: "no-store" }));
    } catch (err) {
      fail(`Could not load the next question (${err.message}). Reload the page to try again.`);
      setState("error");
      return;
    }
    $("progress").max = data.total;
    $("progress").value = data.answered;
    if (data.done) {
      item = null;
      $("screen").hidden = true;
      $("done").hidden = false;
      $("progress-text").textContent = `All ${data.total} questions answered`;
      setState("done");
      return;
    }
    item = data.item;
    $("progress-text").textContent =
      `Question ${data.answered + 1} of ${data.total} (subject ${item.subject_number} of ${item.subjects})`;
    $("question").textContent = item.question_text;
    $("prompt").textContent = item.prompt;
    const references = item.references.map((src) => {
      const img = document.createElement("img");
      img.alt = "reference image";
      return img;
    });
    $("references").replaceChildren(...references);
    try {
      await Promise.all([
        load($("left-img"), item.left),
        load($("right-img"), item.right),
        ...references.map((img, i) => load(img, item.references[i])),
      ]);
    } catch (err) {
      fail(`${err.message}. Reload the page to try again.`);
      setState("error");
      return;
    }
    Object.assign(root.dataset, {
      position: item.position,
      subject: item.subject,
      promptId: item.prompt_id,
      seed: item.seed,
      question: item.question,
    });
    $("screen").hidden = false;
    setState("ready");
    enable(true);
  }

  async function answer(choice) {
    if (busy || !item) return;
    enable(false);
    setState("sending");
    if (document.activeElement instanceof HTMLElement) document.activeElement.blur();
    const body = {
      subject: item.subject,
      prompt_id: item.prompt_id,
      seed: item.seed,
      question: item.question,
      choice,
      shown_at: item.shown_at,
    };
    try {
      const response = await fetch(`${api}/answer`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (response.status !== 409) await json(response); // 409: already recorded, go on
    } catch (err) {
      fail(`Your answer was not recorded (${err.message}). Please answer again.`);
      setState("ready");
      enable(true);
      return;
    }
    $("error").hidden = true;
    await next();
  }

  document.addEventListener("click", (event) => {
    const target = event.target.closest("[data-choice]");
    if (target) answer(target.dataset.choice);
  });
  document.addEventListener("keydown", (event) => {
    if (event.repeat || event.altKey || event.ctrlKey || event.metaKey) return;
    const choice = KEYS[event.key];
    if (choice) {
      event.preventDefault();
      answer(choice);
    }
  });
  next();
})();

// Renders Ollama templates with Ollama's own template package (the pinned version), for
// tests/unit/test_chat_formats.py: reads [{template, messages, tools, think}] as JSON on stdin and writes
// [{prompt, think_open, think_close, vars, tool_calls, content} | {error}] as JSON. The test writes go.mod beside it.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"

	"github.com/ollama/ollama/api"
	"github.com/ollama/ollama/template"
	"github.com/ollama/ollama/thinking"
	"github.com/ollama/ollama/tools"
)

type request struct {
	Template string        `json:"template"`
	Messages []api.Message `json:"messages"`
	Tools    api.Tools     `json:"tools"`
	Think    *bool         `json:"think"`
	Reply    string        `json:"reply"` // a model's reply, parsed for tool calls as /api/chat parses it
}

func main() {
	var reqs []request
	if err := json.NewDecoder(os.Stdin).Decode(&reqs); err != nil {
		panic(err)
	}
	var out []map[string]any
	for _, r := range reqs {
		t, err := template.Parse(r.Template)
		if err != nil {
			out = append(out, map[string]any{"error": err.Error()})
			continue
		}
		open, closing := thinking.InferTags(t.Template)
		vars, _ := t.Vars()
		v := template.Values{Messages: r.Messages, Tools: r.Tools}
		if r.Think != nil {
			v.Think, v.IsThinkSet = *r.Think, true
		}
		var b bytes.Buffer
		if err := t.Execute(&b, v); err != nil {
			out = append(out, map[string]any{"error": err.Error()})
			continue
		}
		result := map[string]any{"prompt": b.String(), "think_open": open, "think_close": closing, "vars": vars}
		if r.Reply != "" {
			calls, content := tools.NewParser(t.Template, r.Tools).Add(r.Reply)
			result["tool_calls"], result["content"] = calls, content
		}
		out = append(out, result)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
